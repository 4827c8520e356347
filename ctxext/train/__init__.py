"""Fine-tuning: the YAML config, the progressive-length loop on accelerate, its loss, schedule, sharding and
memory plan."""
