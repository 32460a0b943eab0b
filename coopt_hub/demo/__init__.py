"""The end-to-end demo on an embedded hub, with scikit-learn's digits as the source."""
