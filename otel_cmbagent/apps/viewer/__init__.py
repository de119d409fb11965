"""Live run viewer (web page + JSON API)."""
