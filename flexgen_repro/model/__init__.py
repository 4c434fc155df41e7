"""OPT as layers sharing one interface, the attention maths, and weights at home."""
