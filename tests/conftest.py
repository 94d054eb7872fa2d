import os

# Tests run on the CPU; 8 host devices lets sharding tests see a mesh.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
