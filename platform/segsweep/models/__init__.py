"""Models: smp networks and their pretrained encoder weights."""
