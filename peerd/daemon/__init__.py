"""The daemon process behind ``peerd start``: config, control socket, shared
memory hand-off, metrics."""
