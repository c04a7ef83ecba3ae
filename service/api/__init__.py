"""HTTP routers, one per endpoint; they translate HTTP to service calls and nothing more."""
