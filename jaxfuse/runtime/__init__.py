"""Running compiled programs: compiling once, the compile cache, timing without compilation, memory
per device, placing parameters on a mesh (`programs`), and what memory a machine has (`memory`)."""
