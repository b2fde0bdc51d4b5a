"""The steps of `vcluster up` and `down`: small named actions run in order over one context."""
