"""The KV memory tiers below HBM: host DRAM and local SSD, content-addressed by block hash."""
