"""Load generator and engine/kernel benchmarks; results/ holds committed JSON."""
