# The native addon (native/imgmount.c): plain C11 against Node-API, built by
# scripts/build-native.mjs (npm run build) into build/Release/imgmount.node.
{
  "targets": [
    {
      "target_name": "imgmount",
      "sources": ["native/imgmount.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags_c": ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ]
}
