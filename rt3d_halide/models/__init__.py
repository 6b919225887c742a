"""Models shipped in the package: the build's embedded default lives here as an ONNX file."""
