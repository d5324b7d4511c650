#!/usr/bin/env bash
# Rebuilds the reddino-chula model (models/chula/reddino-chula.tar) from a Chula RBC-12 folder
# and the figures of its model card (docs/models/chula.md): the development fields imported as
# crops cut by the edge's own finder (5 folds by field), self-supervised pretraining on every
# crop of them (no labels), probes of the pretrained features and of the two baselines (the
# same ViT with random weights, raw pixels) under 5-fold cross-validation by field,
# fine-tuning cross-validated the same way, the final fine-tune on every development field,
# its head calibrated on the folds' logits (`calibrate`), its score on the held-out fields,
# and the export signed with the demo key. About 80 minutes on two cores of an Intel Xeon,
# about 110 on two of an AMD EPYC (docs/models/chula.md); everything goes under
# target/chula-model/ (override with CHULA_MODEL_WORK).
#
#   ./scripts/chula-model.sh [DATA]            # DATA: default ../shared/data/chula-rbc-12
#   ./scripts/chula-model.sh [DATA] --no-ship  # everything but replacing the shipped bundle
#   CHULA_MODEL_PIXELS=0 ./scripts/chula-model.sh   # without the raw-pixel probe (18 min less)
#   CHULA_MODEL_PROBES=0 ./scripts/chula-model.sh   # without the frozen-feature probes (7 min)
#   CHULA_MODEL_EPOCHS=10, CHULA_MODEL_UM_PER_PX=0  # fewer epochs; the head without the size
#   CHULA_MODEL_VIEWS=1 (or 8)   # test-time views: the crop alone, or its quarter turns and
#                                # their mirror images (default 4, its quarter turns)
#   CHULA_MODEL_MARGIN=1.3       # the crops the model is fine-tuned on, probed and cut at on the
#                                # device (the manifest's crop_margin unless it is 1.3, the
#                                # edge's default): side as a multiple of the cell's box
#                                # (default 1.1, the cell and little of its neighbours;
#                                # pretraining's crops are cut at 1.3 either way)
#   CHULA_MODEL_PRETRAIN=docs/models/chula-pretrain-dino.toml ./scripts/chula-model.sh DATA --no-ship
#       # another pretraining config (that one: 3 000 steps whose DINO loss learns; see the card)
# Each step's time goes to $W/times.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:-../shared/data/chula-rbc-12}
ship=1
if [[ "${2:-}" == "--no-ship" ]]; then
    ship=0
fi
if [[ ! -d "$DATA/images" ]]; then
    echo "no Chula RBC-12 folder at $DATA (expected $DATA/images and $DATA/labels)" >&2
    exit 2
fi

./scripts/system-deps.sh
. scripts/torch-env.sh
cargo build --release --locked -p reddino-trainer -p reddino-models -p reddino-edge
T=target/release
W=${CHULA_MODEL_WORK:-target/chula-model}
SIZE=56
EPOCHS=${CHULA_MODEL_EPOCHS:-20}
# Micrometres per pixel of the Chula fields (1000x, 640x480), estimated: the normal cells'
# median box (42 px) taken as a normal red cell's 7.5 um. The head takes each cell's size at
# this scale (`finetune --cell-size`); 0 = the crop alone.
UM_PER_PX=${CHULA_MODEL_UM_PER_PX:-0.18}
# The model averages each crop's logits over its quarter turns (`export --test-time-views`);
# cross-validation and the held-out score read it the same way.
VIEWS=${CHULA_MODEL_VIEWS:-4}
MARGIN=${CHULA_MODEL_MARGIN:-1.1}
FT=(--epochs "$EPOCHS" --lr 2e-3 --layer-decay 0.9 --threads 2 --balanced --pixel-ops 0 --crop-scale 1.0)
if [[ "$UM_PER_PX" != 0 ]]; then
    FT+=(--cell-size "$UM_PER_PX")
fi
rm -rf "$W"
mkdir -p "$W"
export RUST_LOG=${RUST_LOG:-info}
data=$(cd "$DATA" && pwd)

step_start=$SECONDS
step() { # name: the time since the last step, to $W/times.txt
    echo "$1 $((SECONDS - step_start)) s" | tee -a "$W/times.txt"
    step_start=$SECONDS
}

echo "== 1/7 import: development fields in 5 folds by field, held-out fields apart"
# Pretraining's crops at the edge's default margin (1.3: a cell with some of its
# surroundings), labelled or not; the labelled crops again at the model's margin when it is
# another (the manifest then carries it).
$T/reddino-edge import --points "$data" --fields dev --folds 5 --out "$W/crops-1.3" \
    --unlabelled "$W/unlabelled"
MARGIN_FLAG=()
if [[ "$MARGIN" == 1.3 ]]; then
    ln -s crops-1.3 "$W/crops"
else
    $T/reddino-edge import --points "$data" --fields dev --folds 5 --out "$W/crops" \
        --margin "$MARGIN"
    MARGIN_FLAG=(--crop-margin "$MARGIN")
fi
$T/reddino-edge import --points "$data" --fields test --out "$W/heldout" --margin "$MARGIN"
mkdir -p "$W/ssl"
ln -s ../crops-1.3 "$W/ssl/labelled"
ln -s ../unlabelled "$W/ssl/unlabelled"
step import

echo "== 2/7 self-supervised pretraining (DINOv2 losses, every crop of the development fields)"
cp "${CHULA_MODEL_PRETRAIN:-docs/models/chula-pretrain.toml}" "$W/pretrain.toml" # paths relative to $W
(cd "$W" && "../release/reddino-trainer" pretrain --config pretrain.toml)
PRETRAINED="$W/pretrain/checkpoints/$(cat "$W/pretrain/checkpoints/last")/backbone.safetensors"
step pretrain

echo "== 3/7 probes, 5-fold by field: pretrained, random weights, raw pixels"
if [[ "${CHULA_MODEL_PROBES:-1}" != 0 ]]; then
    for f in model random-init; do
        $T/reddino-trainer eval --checkpoint "$PRETRAINED" --data "$W/crops" --out "$W/probe-$f" \
            --loso-only --features "$f" >/dev/null
    done
    step probes
fi
# Raw pixels at 28 px (2 352 features; at 56 px the logistic regression takes over an hour).
if [[ "${CHULA_MODEL_PIXELS:-1}" != 0 ]]; then
    $T/reddino-trainer eval --checkpoint "$PRETRAINED" --input-size 28 --data "$W/crops" \
        --out "$W/probe-pixels" --loso-only --features pixels >/dev/null
    step pixel-probe
fi

echo "== 4/7 fine-tuning, 5-fold by field, then on every development field; calibration"
$T/reddino-trainer finetune --checkpoint "$PRETRAINED" --data "$W/crops" --out "$W/finetune" \
    "${FT[@]}" --test-time-views "$VIEWS" --cross-validate >/dev/null
# The head's logits divided by the temperature fitted on the folds' out-of-fold logits: the
# same classes, a top probability that says how often it is right.
$T/reddino-trainer calibrate --logits "$W/finetune/cv/logits.csv" \
    --head "$W/finetune/head.safetensors" --test-time-views "$VIEWS" \
    --out "$W/finetune/calibrated/head.safetensors"
HEAD="$W/finetune/calibrated/head.safetensors"
step finetune

echo "== 5/7 the held-out fields"
$T/reddino-trainer score --checkpoint "$W/finetune/backbone.safetensors" \
    --head "$HEAD" --data "$W/heldout" --out "$W/score-heldout" \
    --test-time-views "$VIEWS" >/dev/null
step score

echo "== 6/7 export, signed with the demo key"
$T/reddino-trainer export --checkpoint "$W/finetune/backbone.safetensors" \
    --head "$HEAD" --input-size $SIZE --out "$W/bundle" \
    --sign models/demo/demo.sec --name reddino-chula --version 0.5.0 --cell-finder real-smear \
    "${MARGIN_FLAG[@]}" \
    --test-time-views "$VIEWS" \
    --description "ViT-tiny (8 blocks) pretrained and fine-tuned on Chula RBC-12 development fields (docs/models/chula.md); one lab, one microscope; demo key; not for diagnosis" \
    --tar
$T/reddino-models bundle verify "$W/bundle.tar" --trusted-key models/demo/demo.pub --self-test
if [[ $ship == 1 ]]; then
    mkdir -p models/chula
    cp "$W/bundle.tar" models/chula/reddino-chula.tar
    echo "models/chula/reddino-chula.tar replaced"
fi

step export
echo "== 7/7 figures for docs/models/chula.md"
for r in finetune/cv probe-model probe-random-init probe-pixels score-heldout; do
    if [[ -f "$W/$r/report.md" ]]; then
        echo "--- $W/$r/report.md"
        sed -n '1,30p' "$W/$r/report.md"
    fi
done
echo "--- times (s)"
cat "$W/times.txt"
echo "total $SECONDS s" 
