"""One adapter per provider family; each translates requests and maps errors."""
