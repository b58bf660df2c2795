"""The KV tiers, fastest first: GPU memory, host memory, local SSD. One definition for the SLO classes'
lowest tier, the KV index and the tier policy."""

TIERS = ("hbm", "dram", "ssd")
