"""The cost model: hardware profiles, the equations of one layer's time and memory, the policy
search (an LP inside a search over block shapes), measurement of this machine, and calibration
against measured runs."""
