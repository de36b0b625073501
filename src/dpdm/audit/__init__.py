"""Empirical privacy audits: ε lower bounds (bounds.py) from canaries inserted into a real DP-SGD run
(canaries.py). Above training in the layers: an audit trains the real module with canaries added."""
