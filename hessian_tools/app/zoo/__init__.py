"""The embedded models and datasets: everything runs offline on them."""
