#!/usr/bin/env bash
# Rebuild the dictionary sets shipped for the embedded model, then the quality tables and the
# frequency histograms (dictionaries/<model>/README.md).
#
#   bash scripts/shipped_dictionaries.sh          # every stage; rerunning resumes: finished
#                                                 # dictionaries are skipped, an interrupted train
#                                                 # command resumes from its OUT/.checkpoint
#   STAGE=mse bash scripts/shipped_dictionaries.sh   # one stage: mse, kl, kl-resid, transcoders,
#                                                    # wide, main-wide, swap or report
#
# Recipe (chosen by the Pareto study of docs/training.md on resid.2): top-k dictionaries with
# AuxK, 1024 latents (4096 in `wide`), activations normalised to mean squared norm d; trained on
# MSE for MSE_TOKENS, then fine-tuned through the spliced model on the KL of the next-token
# distributions for KL_TOKENS (error term zeroed; `--loss kl --init`); residual dictionaries still
# above the CE bar continue for up to KL_RESID_ROUNDS x KL_RESID_TOKENS more, then up to
# KL_DECAY_ROUNDS rounds with a decaying LR; one of `main` still above it after all rounds is
# replaced by `wide`'s; every residual dictionary then has one round of error-swap KL
# (SWAP_TOKENS). k = 32 on the residual stream (quality bar: L0 <= 32) and 64 on
# attention and MLP outputs (bar: L0 <= 64).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(python -c "from sae_circuits.models import EMBEDDED_MODEL_NAME as n; print(n)")
LAYERS=$(python -c "import json; print(json.load(open('models/$MODEL/config.json'))['num_hidden_layers'])")
OUT=${OUT:-dictionaries/$MODEL}
RUNS=${RUNS:-runs/shipped}
MSE_TOKENS=${MSE_TOKENS:-2000000}
KL_TOKENS=${KL_TOKENS:-200000}
KL_RESID_TOKENS=${KL_RESID_TOKENS:-600000}
KL_RESID_ROUNDS=${KL_RESID_ROUNDS:-3}
KL_DECAY_ROUNDS=${KL_DECAY_ROUNDS:-2}
WIDE_TOKENS=${WIDE_TOKENS:-3000000}
SWAP_TOKENS=${SWAP_TOKENS:-600000}
STAGE=${STAGE:-all}
COMMON=(--seed 0 --kind topk --batch-size 1024 --warmup-steps 100 --n-ctxs 256 --ctx-len 128
        --eval-tokens "${EVAL_TOKENS:-16384}" --checkpoint-every 200)

sites() {  # sites KIND...: KIND.0 ... KIND.(LAYERS-1) for each kind, as --site arguments
  for kind in "$@"; do
    for ((layer = 0; layer < LAYERS; layer++)); do printf -- '--site %s.%d ' "$kind" "$layer"; done
  done
}
resid_sites() { for ((layer = 0; layer < LAYERS; layer++)); do echo "resid.$layer"; done; }
run() { [[ "$STAGE" == all || "$STAGE" == "$1" ]]; }
trained() { [[ -f "$1/config.json" ]]; }  # a finished train command saved its config last
above_bar() {  # above_bar FOLDER: its CE increase (measured by train) is above 0.05 nats
  python -c "import json, sys; sys.exit(json.load(open(sys.argv[1] + '/config.json'))['metrics']['ce_delta'] <= 0.05)" "$1"
}
size_of() { python -c "import json, sys; print(json.load(open(sys.argv[1] + '/config.json'))['d_dict'])" "$1"; }
k_of() { python -c "import json, sys; print(json.load(open(sys.argv[1] + '/config.json'))['k'])" "$1"; }
# kl_rounds SET DICT_SIZE START PREFIX SITE...: each dictionary of SET at SITE (trained first in
# START/) whose CE increase is still above the bar (0.05 nats) continues its KL fine-tuning in
# rounds of KL_RESID_TOKENS tokens into RUNS/PREFIX-1, -2, ... (each from the previous round's
# weights), at most KL_RESID_ROUNDS rounds at a constant LR, then at most KL_DECAY_ROUNDS rounds whose
# LR decays linearly to 0 from 30% of their steps (RUNS/PREFIX-decay-1, ...); the last weights are
# copied to OUT/SET.
kl_rounds() {
  local set=$1 size=$2 start=$3 prefix=$4 site from to round
  shift 4
  for site in "$@"; do
    from=$start
    for ((round = 1; round <= KL_RESID_ROUNDS + KL_DECAY_ROUNDS; round++)); do
      above_bar "$from/$site" || break
      local schedule=()
      to=$RUNS/$prefix-$round
      if ((round > KL_RESID_ROUNDS)); then
        schedule=(--decay-start 0.3)
        to=$RUNS/$prefix-decay-$((round - KL_RESID_ROUNDS))
      fi
      trained "$to/$site" ||
        sae-circuits train --site "$site" --dict-size "$size" --k 32 --loss kl \
          --init "$from/$site" --lr 3e-4 --tokens "$KL_RESID_TOKENS" "${COMMON[@]}" \
          --warmup-steps 20 "${schedule[@]}" --fp16 --out "$to"
      from=$to
    done
    mkdir -p "$OUT/$set"
    rm -rf "${OUT:?}/$set/$site"
    cp -r "$from/$site" "$OUT/$set/$site"
  done
}

# 1. MSE + AuxK from scratch (all sites of a k in one pass over the model).
if run mse; then
  last=$((LAYERS - 1))
  # shellcheck disable=SC2046
  trained "$RUNS/mse/resid.$last" ||
    sae-circuits train --site embed $(sites resid) --dict-size 1024 --k 32 --normalize \
      --tokens "$MSE_TOKENS" "${COMMON[@]}" --out "$RUNS/mse"
  # shellcheck disable=SC2046
  trained "$RUNS/mse/mlp.$last" ||
    sae-circuits train $(sites attn mlp) --dict-size 1024 --k 64 --normalize \
      --tokens "$MSE_TOKENS" "${COMMON[@]}" --out "$RUNS/mse"
fi

# 2. KL fine-tuning through the spliced model, one dictionary per command (each starts from its
#    MSE folder), into the shipped `main` set.
if run kl; then
  for folder in "$RUNS"/mse/*/; do
    folder=${folder%/}
    site=$(basename "$folder")
    k=$(k_of "$folder")
    trained "$RUNS/kl/$site" ||
      sae-circuits train --site "$site" --dict-size 1024 --k "$k" --loss kl --init "$folder" \
        --lr 3e-4 --tokens "$KL_TOKENS" "${COMMON[@]}" --warmup-steps 20 --fp16 \
        --out "$RUNS/kl"
    mkdir -p "$OUT/main"
    rm -rf "$OUT/main/$site"
    cp -r "$RUNS/kl/$site" "$OUT/main/$site"
  done
fi

# 2b. Residual dictionaries of `main` still above the CE bar continue their KL fine-tuning (kl_rounds).
if run kl-resid; then
  # shellcheck disable=SC2046
  kl_rounds main 1024 "$RUNS/kl" kl-resid $(resid_sites)
fi

# 3. MLP transcoders mlp_in.L -> mlp.L (top-k 64 with AuxK, skip connection), set `transcoders`.
if run transcoders; then
  for ((layer = 0; layer < LAYERS; layer++)); do
    trained "$OUT/transcoders/mlp.$layer" ||
      sae-circuits train --kind transcoder --site "mlp_in.$layer" --target-site "mlp.$layer" \
        --skip --dict-size 1024 --k 64 --normalize --tokens "$MSE_TOKENS" \
        "${COMMON[@]/topk/transcoder}" --fp16 --out "$OUT/transcoders"
  done
fi

# 4. wide: 4096 latents at the residual stream (MSE + AuxK on WIDE_TOKENS, then KL, then KL rounds
#    as in 2b).
if run wide; then
  # shellcheck disable=SC2046
  trained "$RUNS/wide-mse/resid.$((LAYERS - 1))" ||
    sae-circuits train $(sites resid) --dict-size 4096 --k 32 --normalize \
      --tokens "$WIDE_TOKENS" "${COMMON[@]}" --out "$RUNS/wide-mse"
  for folder in "$RUNS"/wide-mse/*/; do
    folder=${folder%/}
    site=$(basename "$folder")
    trained "$RUNS/wide-kl/$site" ||
      sae-circuits train --site "$site" --dict-size 4096 --k 32 --loss kl --init "$folder" \
        --lr 3e-4 --tokens "$KL_TOKENS" "${COMMON[@]}" --warmup-steps 20 --fp16 \
        --out "$RUNS/wide-kl"
  done
  # shellcheck disable=SC2046
  kl_rounds wide 4096 "$RUNS/wide-kl" wide-kl-resid $(resid_sites)  # copies the last weights to OUT/wide
fi

# 5. A residual dictionary of `main` still above the CE bar after every round of 2b is replaced by
#    `wide`'s at that site (4096 latents): at 1024 latents the rounds level off above the bar.
if run main-wide; then
  for site in $(resid_sites); do
    if above_bar "$OUT/main/$site"; then
      above_bar "$OUT/wide/$site" && { echo "wide/$site is above the CE bar too" >&2; exit 1; }
      rm -rf "${OUT:?}/main/$site"
      cp -r "$OUT/wide/$site" "$OUT/main/$site"
    fi
  done
fi

# 6. Error-swap rounds: every residual dictionary of SWAP_SETS continues its KL fine-tuning for
#    SWAP_TOKENS with `--error-swap 1` (the KL taken with another context's error term added to
#    the reconstruction, see docs/training.md), from the weights in OUT into RUNS/swap-SET, or if
#    that costs the CE bar with `--error-swap 0.5` (RUNS/swap-0.5-SET), and replaces them when it
#    meets the bar (else they stay, with a message). `main`'s
#    dictionaries that are `wide`'s (step 5) take `wide`'s result. SWAP_SITES limits the sites
#    (e.g. to run sets and sites side by side in several processes).
if run swap; then
  for set in ${SWAP_SETS:-wide main}; do
    for site in ${SWAP_SITES:-$(resid_sites)}; do
      from=$OUT/$set/$site
      [[ $set == main && $(size_of "$from") == 4096 ]] && continue  # wide's: copied below
      for share in 1 0.5; do  # half the KL with the error dropped when all of it costs the bar
        to=$RUNS/swap-$set
        [[ $share == 1 ]] || to=$RUNS/swap-$share-$set
        trained "$to/$site" ||
          sae-circuits train --site "$site" --dict-size "$(size_of "$from")" --k 32 --loss kl \
            --error-swap "$share" --init "$from" --lr 3e-4 --tokens "$SWAP_TOKENS" \
            "${COMMON[@]}" --warmup-steps 20 --fp16 --out "$to"
        above_bar "$to/$site" || break
        echo "$to/$site is above the CE bar" >&2
      done
      if above_bar "$to/$site"; then
        echo "$set/$site stays" >&2
      else
        rm -rf "${OUT:?}/$set/$site"
        cp -r "$to/$site" "$OUT/$set/$site"
      fi
    done
  done
  for site in $(resid_sites); do
    if [[ $(size_of "$OUT/main/$site") == 4096 ]]; then
      rm -rf "${OUT:?}/main/$site"
      cp -r "$OUT/wide/$site" "$OUT/main/$site"
    fi
  done
fi

if run report; then
  python scripts/dictionary_report.py
fi
