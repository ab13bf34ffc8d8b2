"""The metadata service: the WSGI app, the CloudStack, EC2 and DigitalOcean views,
IMDSv2 tokens, refusal counters and the per-worker VM cache."""
