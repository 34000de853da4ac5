"""Support for fastpath's own test suite; nothing here is used by the plugin at run time."""
