"""Jobs from other services over Redis: the protocol (keys, spec, state), the daemon that runs
them (``gpen-stream serve``) and a small client (``gpen-stream submit/status/cancel/watch``)."""
