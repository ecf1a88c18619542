"""Engine start, opened up: phases recorded inside vLLM's own processes.

The replica (:mod:`._replica`, used by ``ObservedLLMServer``) asks for them by putting a small
JSON config and the W3C ``TRACEPARENT`` of its engine-start span into the environment before it
builds the engine; vLLM's engine-core and worker processes inherit both. vLLM loads its
``vllm.general_plugins`` entry point (``llm_otel_callbacks_vllm_plugin:register``) in each of
them, and :mod:`._process` then records that process's phases as spans under the engine-start
span, at the internal points named in :mod:`._points`. Each phase is also reported to the
replica in one UDP datagram on 127.0.0.1, so the replica (the Ray worker whose metrics Ray
scrapes) records ``startup_phase_duration_seconds`` and can name the phase a failed start died in.
"""
