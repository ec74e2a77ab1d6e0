#!/usr/bin/env bash
# The reproduction study on the embedded default (configs/synthetic.py, the paper's geometry at half scale), in two
# stages, each over seeds, one run at a time (JOBS=N: N at once), resumable (rerun the same command; finished runs
# are skipped):
#   mkdir -p runs
#   STAGE=tune nohup bash launch/study.sh > runs/study_tune.out 2>&1 &    # 1. every method's weights, on "tune"
#   STAGE=test nohup bash launch/study.sh > runs/study_test.out 2>&1 &    # 2. the reported rows, on "test" (1000)
#   STAGE=choose bash launch/study.sh                                 # between them: the choices of stage 1
#   STAGE=answer bash launch/study.sh                                 # after them: the claims' verdicts
# Stage 1 trains every method of Tables 1 and 5 with the same budget (3 values of its loss weight x 2 seeds, 100 and
# 101) and scores it on the tune split; plain DeepLabv3+ is there as the reference. STAGE=choose then picks every
# value by the rule of dilaff_jax/research/tuning.py (TUNE_CHOICES below: what is chosen from which rows) and writes
# it with the evidence to results/study_synthetic/tuning.{md,json,png}; the values are written into configs/synthetic.py
# by hand, and only then stage 2 runs: it refuses to start while the config differs from tuning.json. Stage 2's rows
# and seeds, including the fresh seeds 5-7 that re-test every "better than" claim of the headline rows, are declared
# here before any of them runs.
# `kill <pid>` (SIGTERM) stops after the running runs saved a checkpoint. Extra arguments go to
# `python -m dilaff_jax.research.study` (e.g. --config.KEY=VALUE for every run). WORKDIR: runs/study_<stage>; results there
# (study.md, .json, .png); `--aggregate_only --export=results/study_synthetic/<stage>` keeps the small files.
# On another machine, go on from the committed export: cp -r results/study_synthetic/<stage> runs/study_<stage>
# first (finished runs are skipped; a run whose checkpoints an evaluate row needs is trained again).
# A run takes about 20-25 minutes on 2 quiet CPU cores (1000 steps of batch 4 at crop 257, then evaluation), about
# 34 minutes on one core of two at JOBS=2; the evaluation of all 1000 test scenes about 11 of them. On 2 cores
# stage tune (44 trainings, 18 evaluations of 300 scenes) takes about 13 hours, stage test (53 trainings, 16
# evaluations of 1000 scenes) about 16 to 17. Machines of the same description differ: on another 2-core machine
# (2026-12-07, 00:00-03:10 UTC) a training of stage tune took about 52 minutes on one core of two, 1.5x as long; on
# the next (2026-12-07 from 03:40 UTC) 32-36 minutes without the affinity head and 40-44 with it.
# JOBS=N: N runs at once, each pinned to cores/N cores (about 3 GiB of memory each). On 2 cores JOBS=2 gets 1.27x as
# many runs done (benchmarks/study_jobs.py); a run's last bits depend on its core count (recorded in its run.json).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:-tune}
T=@dataset.eval_split=tune
TUNE_ROWS="
tune_baseline=baseline$T
tune_sqrt_b0.1=default@affinity.beta=0.1$T
tune_sqrt_b0.3=default@affinity.beta=0.3$T
tune_sqrt_b1=default@affinity.beta=1.0$T
tune_aaf_w0.3=aaf@structure.aaf_weight=0.3$T
tune_aaf_w1=aaf@structure.aaf_weight=1.0$T
tune_aaf_w3=aaf@structure.aaf_weight=3.0$T
tune_boundary_w3=boundary@structure.boundary_w0=3.0$T
tune_boundary_w10=boundary@structure.boundary_w0=10.0$T
tune_boundary_w30=boundary@structure.boundary_w0=30.0$T
tune_t1_none_b0.1=table1_none@affinity.beta=0.1$T
tune_t1_none_b0.3=table1_none@affinity.beta=0.3$T
tune_t1_none_b1=table1_none@affinity.beta=1.0$T
tune_t1_signal_b0.1=table1_signal@affinity.beta=0.1$T
tune_t1_signal_b0.3=table1_signal@affinity.beta=0.3$T
tune_t1_signal_b1=table1_signal@affinity.beta=1.0$T
tune_t1_neighbor_b0.1=table1_neighbor@affinity.beta=0.1$T
tune_t1_neighbor_b0.3=table1_neighbor@affinity.beta=0.3$T
tune_t1_neighbor_b1=table1_neighbor@affinity.beta=1.0$T
tune_t1_sqrt_b0.1=table1_sqrt@affinity.beta=0.1$T
tune_t1_sqrt_b0.3=table1_sqrt@affinity.beta=0.3$T
tune_t1_sqrt_b1=table1_sqrt@affinity.beta=1.0$T
tune_sqrt_b0.1_lam3=evaluate:tune_sqrt_b0.1@affinity.lam=3.0
tune_sqrt_b0.1_lam12=evaluate:tune_sqrt_b0.1@affinity.lam=12.0
tune_sqrt_b0.3_lam3=evaluate:tune_sqrt_b0.3@affinity.lam=3.0
tune_sqrt_b0.3_lam12=evaluate:tune_sqrt_b0.3@affinity.lam=12.0
tune_sqrt_b1_lam3=evaluate:tune_sqrt_b1@affinity.lam=3.0
tune_sqrt_b1_lam12=evaluate:tune_sqrt_b1@affinity.lam=12.0
tune_sqrt_b0.1_anchored=evaluate:tune_sqrt_b0.1@affinity.propagation_reading=anchored
tune_sqrt_b0.3_anchored=evaluate:tune_sqrt_b0.3@affinity.propagation_reading=anchored
tune_sqrt_b1_anchored=evaluate:tune_sqrt_b1@affinity.propagation_reading=anchored
"
# Propagation's λ (and, from each evaluation's sweep 0-10, its iteration count) and its reading of Eq. 6 (the paper's,
# or the self term anchored on the network's prediction) are chosen with the default's β on the same tune runs: the
# *_lam* and *_anchored rows only evaluate them again (λ = 6 and the paper's reading: the training rows' own).
# VARIANT:KEY=ROWS: the value of KEY among those rows (highest mean mIoU on tune over the seeds they all finished);
# VARIANT:propagation: λ, the reading of Eq. 6 and the iteration count, on the runs of the row chosen for VARIANT.
TUNE_CHOICES="
default:affinity.beta=tune_sqrt_b0.1,tune_sqrt_b0.3,tune_sqrt_b1
default:propagation
aaf:structure.aaf_weight=tune_aaf_w0.3,tune_aaf_w1,tune_aaf_w3
boundary:structure.boundary_w0=tune_boundary_w3,tune_boundary_w10,tune_boundary_w30
table1_none:affinity.beta=tune_t1_none_b0.1,tune_t1_none_b0.3,tune_t1_none_b1
table1_signal:affinity.beta=tune_t1_signal_b0.1,tune_t1_signal_b0.3,tune_t1_signal_b1
table1_neighbor:affinity.beta=tune_t1_neighbor_b0.1,tune_t1_neighbor_b0.3,tune_t1_neighbor_b1
table1_sqrt:affinity.beta=tune_t1_sqrt_b0.1,tune_t1_sqrt_b0.3,tune_t1_sqrt_b1
"
TUNE_COMPARE="tune_sqrt_b0.3:tune_t1_sqrt_b0.3,tune_aaf_w1:tune_sqrt_b0.3,tune_boundary_w10:tune_sqrt_b0.3"
# Stage 2. Headline rows at 5 seeds; the rest of Tables 1 and 2 at 3; *_fresh: seeds 5, 6, 7, which no other row
# uses, for every claim of the paper that a headline row tests (default better than plain, than AAF, than boundary
# reweighting, than dense CRF; propagation better than none: default's own sweep). The default's propagation is
# evaluated under both readings of Eq. 6 (whichever tune chose, the paper's claim is about the paper's reading); the
# reading the config has is the default's own final evaluation, so the study runs nothing for that row.
TEST_ROWS="
baseline=baseline#0,1,2,3,4
default=default#0,1,2,3,4
aaf=aaf#0,1,2,3,4
boundary=boundary#0,1,2,3,4
baseline+crf=evaluate:baseline@eval.crf=True#0,1,2,3,4
default+paper=evaluate:default@affinity.propagation_reading=paper#0,1,2,3,4
default+anchored=evaluate:default@affinity.propagation_reading=anchored#0,1,2,3,4
table1_none=table1_none
table1_signal=table1_signal
table1_neighbor=table1_neighbor
table1_sqrt=table1_sqrt
table2_r4_8=table2_r4_8
table2_r4_8_16=table2_r4_8_16
table2_r4_6x12_8_16x32_24=table2_r4_6x12_8_16x32_24
baseline_fresh=baseline#5,6,7
default_fresh=default#5,6,7
aaf_fresh=aaf#5,6,7
boundary_fresh=boundary#5,6,7
baseline_fresh+crf=evaluate:baseline_fresh@eval.crf=True#5,6,7
default_fresh+paper=evaluate:default_fresh@affinity.propagation_reading=paper#5,6,7
default_fresh+anchored=evaluate:default_fresh@affinity.propagation_reading=anchored#5,6,7
"
# Stage 2 runs the headline rows (and the rows evaluating them) first, every seed, then Tables 1 and 2.
TEST_FIRST="baseline,default,aaf,boundary,baseline_fresh,default_fresh,aaf_fresh,boundary_fresh"
TEST_COMPARE="default:aaf,default:boundary,default:baseline+crf,aaf:baseline+crf,\
table1_sqrt:table1_none,table1_signal:table1_none,table1_neighbor:table1_none,table1_sqrt:table1_neighbor,\
table2_r4_8:default,table2_r4_8_16:default,table2_r4_6x12_8_16x32_24:default,table1_sqrt:default,\
default_fresh:baseline_fresh,default_fresh:aaf_fresh,default_fresh:boundary_fresh,default_fresh:baseline_fresh+crf,\
default+anchored:default+paper,default_fresh+anchored:default_fresh+paper"
# The claims the answer reads (STAGE=answer, by the rule of dilaff_jax/research/answer.py and docs/reproduction.md):
# TITLE=TEST|FRESH_TEST; Tables 1 and 2 as the paper's orders of adjacent rows (3 seeds: at most "suggested").
TEST_CLAIMS="
joint training helps=default>baseline|default_fresh>baseline_fresh
dilated affinity beats AAF=default>aaf|default_fresh>aaf_fresh
dilated affinity beats boundary reweighting=default>boundary|default_fresh>boundary_fresh
dilated affinity beats dense CRF=default>baseline+crf|default_fresh>baseline_fresh+crf
dilated affinity with propagation beats dense CRF=default>baseline+crf@miou_propagated|default_fresh>baseline_fresh+crf@miou_propagated
propagation rises up to 10 iterations (the paper's reading of Eq. 6)=sweep:default+paper|sweep:default_fresh+paper
propagation rises up to 10 iterations (quoted beside it: the anchored reading)=sweep:default+anchored|sweep:default_fresh+anchored
Table 1: sqrt above neighbor=order:table1_sqrt>table1_neighbor
Table 1: neighbor above signal=order:table1_neighbor>table1_signal
Table 1: signal above none=order:table1_signal>table1_none
Table 1: sqrt above none=order:table1_sqrt>table1_none
Table 2: {4, 8} above {4, 8, 16}=order:table2_r4_8>table2_r4_8_16
Table 2: {4, 8, 16} above the default {4, (6, 12), 8}=order:table2_r4_8_16>default
Table 2: the default above {4, (6, 12), 8, (16, 32), 24}=order:default>table2_r4_6x12_8_16x32_24
"
case "$STAGE" in
  tune) DEFAULT_ROWS=$TUNE_ROWS; DEFAULT_COMPARE=$TUNE_COMPARE; BASELINE=tune_baseline; SEEDS=${SEEDS:-100,101}
    DEFAULT_FIRST=; STAGE_FLAGS= ;;
  choose)
    bash launch/setup.sh
    # ALLOW_UNFINISHED=1: a provisional choice while stage 1 runs (marked as such; stage 2 does not start from it)
    exec .venv/bin/python -m dilaff_jax.research.tuning --workdir="${WORKDIR:-runs/study_tune}" \
      --choices="$TUNE_CHOICES" --output=results/study_synthetic/tuning \
      ${ALLOW_UNFINISHED:+--allow_unfinished} "$@" ;;
  test) DEFAULT_ROWS=$TEST_ROWS; DEFAULT_COMPARE=$TEST_COMPARE; BASELINE=baseline; SEEDS=${SEEDS:-0,1,2}
    DEFAULT_FIRST=$TEST_FIRST
    # No validation during training: it leaves the training unchanged (tests/test_train.py) and the study reads only
    # each run's final evaluation; 50 tune images every 100 steps would cost about a tenth of every run. A checkpoint
    # every 100 steps, as the validations saved one in stage tune: a killed run loses at most 100 steps.
    STAGE_FLAGS="--config.train.eval_every=0 --config.train.checkpoint_every=100" ;;
  answer)  # after stage test: every claim's verdict -> results/study_synthetic/answer.{md,json,png}
    # (marked provisional while runs are unfinished). The first machine's result of default_fresh seed 5, replaced
    # by a training on another CPU (docs/reproduction.md): a claim it touches must read the same with it.
    bash launch/setup.sh
    exec .venv/bin/python -m dilaff_jax.research.answer --workdir="${WORKDIR:-runs/study_test}" \
      --claims="$TEST_CLAIMS" --output=results/study_synthetic/answer \
      --tuning=results/study_synthetic/tuning.json \
      --alternatives="${ALTERNATIVES-results/study_synthetic/test_first_machine}" "$@" ;;
  *) echo "error: STAGE=$STAGE: expected tune, choose, test or answer" >&2; exit 2 ;;
esac
if [ "$STAGE" = test ]; then  # its *+crf rows need the dense CRF's optional package (the study checks it at start)
  export EXTRAS=${EXTRAS:-crf}
fi
bash launch/setup.sh
if [ "$STAGE" = test ]; then  # the weights chosen on tune must be the config's (an error line names any that is not)
  .venv/bin/python -m dilaff_jax.research.tuning --check=results/study_synthetic/tuning.json
fi
WORKDIR=${WORKDIR:-runs/study_$STAGE}
# Your own ROWS get no comparisons (nor FIRST rows) unless you give COMPARE (FIRST) too: its rows must be in ROWS.
[ -n "${ROWS:-}" ] && COMPARE=${COMPARE:-} && FIRST=${FIRST:-}
ROWS=${ROWS:-$DEFAULT_ROWS}
COMPARE=${COMPARE-$DEFAULT_COMPARE}
FIRST=${FIRST-$DEFAULT_FIRST}
JOBS=${JOBS:-1}
echo "[launch] python -m dilaff_jax.research.study --workdir=$WORKDIR --seeds=$SEEDS --jobs=$JOBS (stage $STAGE) $*"
# Every run: all images of its split (the README's demo scores the first 250 test images) and 1000 steps instead of
# the demo's 500 (at 500 the loss is still falling; a run further from convergence is likely to vary more by seed).
exec .venv/bin/python -m dilaff_jax.research.study --config=configs/synthetic.py --seeds="$SEEDS" --workdir="$WORKDIR" \
  --baseline_row="$BASELINE" --rows="$ROWS" --compare="$COMPARE" --config.eval.max_images=0 \
  --config.train.num_steps=1000 $STAGE_FLAGS --jobs="$JOBS" --first="$FIRST" "$@"
