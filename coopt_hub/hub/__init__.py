"""The Hub client side: every call to a Hub (client), the source dataset (source), and what a CoOpt\nrepo holds (repo)."""
