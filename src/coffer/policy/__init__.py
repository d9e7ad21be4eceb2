"""Workload policy: one declarative document, compiled to Rego in the Kata agent's shape, bound to the
TEE by initdata and enforced by the agent on every host request.

* :mod:`coffer.policy.model` -- the document's parsed form (and its canonical JSON);
* :mod:`coffer.policy.document` -- strict YAML/JSON parsing with line/field errors, the JSON Schema;
* :mod:`coffer.policy.engine` -- compilation to Rego (``package agent_policy``) and decisions with
  explanations, evaluated by regorus;
* :mod:`coffer.policy.requests` -- the agent requests a container spec and an image config make;
* :mod:`coffer.policy.generate` -- policies from Kubernetes manifests;
* :mod:`coffer.policy.initdata` -- CoCo initdata, its digest and where the TEE holds it;
* :mod:`coffer.policy.lint` -- warnings a reviewer can act on.
"""
