"""Image input: loading, validating and resizing every kind of image the library accepts."""
