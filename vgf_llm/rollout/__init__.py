"""Rollout backends: N completions per prompt as ``Rollouts``.

``hf``: ``Rollouts`` and Hugging Face ``generate`` (the default). vLLM: ``vllm_engine`` (is vLLM usable, the
in-process engine) <- ``vllm_backend`` (``VLLMBackend``, ``make_rollout_backend``) -> ``vllm_client`` (HTTP), with
``vllm_weights`` (the policy's weights for the engine); ``vllm_server`` runs an engine behind HTTP.
"""
