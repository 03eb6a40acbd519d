"""Edge: credentials → tenant context, request ids and trace context, JSON errors."""
