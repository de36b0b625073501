"""Experiments around the core library: the paper's reference numbers, reproduction recipes, throughput
measurement and the collection of sweep results into tables (dpdm-reproduce, dpdm-report)."""
