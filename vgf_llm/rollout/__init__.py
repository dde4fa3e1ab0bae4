"""Rollout backends: N completions per prompt as ``Rollouts``, from the frozen base model.

``hf``: ``Rollouts`` and Hugging Face ``generate`` (the default). vLLM: ``vllm_engine`` (is vLLM usable, the
in-process engine of colocate mode) <- ``vllm_backend`` (``VLLMBackend``, ``make_rollout_backend``) ->
``vllm_client`` (HTTP client of vLLM's own ``vllm serve``, server mode).
"""
