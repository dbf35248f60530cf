"""The HTTP service and its inspection page (``visualad serve``; needs the ``serve`` extra)."""
