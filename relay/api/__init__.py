"""HTTP surfaces: one module each. Routes translate HTTP to service calls and back, nothing more."""
