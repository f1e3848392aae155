"""What a feature does to the next-token logits.

- `ablation_effects`: on given contexts, the change of every vocabulary logit at the activating
  position when the feature is set to zero at every position of the context (an nnsight trace over
  the spliced model: `features.output[:, :, i] = 0` vs. unedited, in one batched trace).
- `direct_effects`: the decoder direction read straight through the unembedding. The final norm is
  folded in as a linear map with unit scale: centring (LayerNorm only) and its elementwise weight
  are applied, the data-dependent division by the activation's norm is left out (a positive factor
  per position, so token rankings are unaffected): `W_U (γ ⊙ (d − mean d))`.
"""

from __future__ import annotations

import torch
from torch import nn

from sae_circuits import engine
from sae_circuits.batches import from_rows, trace_inputs
from sae_circuits.dictionary import Dictionary
from sae_circuits.engine import SiteEdit
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote
from sae_circuits.sites import Site, architecture_of, torch_module
from sae_circuits.splice import spliced, temporarily_attached


def ablation_effects(
    model: Model,
    site: str | Site,
    dictionary: Dictionary,
    feature: int,
    rows: torch.Tensor,
    positions: torch.Tensor,
    remote: Remote = False,
) -> torch.Tensor:
    """(n, V): ablated minus clean logits at `positions` (n,) of context `rows` (n, L), where -1
    marks pad positions. `remote` (True: NDIF, "local": nnsight's simulation) runs it as a
    request."""
    site = Site.parse(site)
    inputs = trace_inputs(*from_rows(rows, model.tokenizer.pad_token_id or 0))
    at = torch.arange(rows.shape[0])
    if remote:
        mask = torch.zeros(dictionary.d_dict, dtype=torch.bool)
        mask[feature] = True
        copies = [{}, {site: SiteEdit(features_mask=mask, features_value=0.0)}]
        tokens = engine.Tokens(inputs["input_ids"], inputs["attention_mask"])
        with temporarily_attached(model, {site: dictionary}):
            logits = engine.edited(model, tokens, copies, remote=remote, all_logits=True).logits
        return (logits[1][at, positions] - logits[0][at, positions]).float().cpu()
    with temporarily_attached(model, {site: dictionary}), torch.no_grad():
        hook = spliced(model, site)
        with model.trace() as tracer:
            with tracer.invoke(**inputs):
                clean = model.output.logits[at, positions].save()
            with tracer.invoke(**inputs):
                hook.features.output[:, :, feature] = 0
                ablated = model.output.logits[at, positions].save()
    return (ablated - clean).float().cpu()


def direct_effects(model: Model, directions: torch.Tensor) -> torch.Tensor | None:
    """(n, V) logit effect of each decoder direction (n, d) through the final norm (unit scale) and
    the unembedding; None when the directions do not live in the residual stream."""
    spec = architecture_of(model)
    module = torch_module(model)
    # The HF accessor, not `spec.unembed`: transformers 5 names GPT-NeoX's unembedding `lm_head`.
    unembed = module.get_output_embeddings().weight  # (V, d)
    if directions.shape[-1] != unembed.shape[1]:
        return None
    norm = module.get_submodule(spec.final_norm)
    d = directions.to(unembed)
    if isinstance(norm, nn.LayerNorm):
        d = d - d.mean(-1, keepdim=True)
    if getattr(norm, "weight", None) is not None:
        d = d * norm.weight
    return (d @ unembed.T).float().cpu()
