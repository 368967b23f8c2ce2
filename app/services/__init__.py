"""Services: the operations of the service, over a session they do not commit."""
