"""Distributed roles (frontend, prefill, decode, draft, KV memory) as Ray Serve deployments, and the CLI."""
