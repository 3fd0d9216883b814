//! AB (activation boundaries): a margin loss on the signs of pre-ReLU maps; an init stage.

use super::LossContext;
use crate::analysis::TensorInfo;
use crate::error::Result;
use crate::plan::connector::{chw, size_matching_conv};
use crate::plan::{
    Connector, InitStage, Layer, MethodSpec, OptionValues, Side, TapKind, TapPair, TrainingStage,
    Weights, SPEC_DEFAULTS,
};

/// The margin m of the activation-boundary loss.
const MARGIN: f32 = 1.0;
/// The reference's scale of each stage's loss: `/ B * 3 / 1000`.
const SCALE: f32 = 3.0 / 1000.0;

pub static SPEC: MethodSpec = MethodSpec {
    id: "ab",
    taps: TapKind::StageEndsPreRelu,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 1.0,
    },
    init_stage: Some(InitStage {
        epochs: super::INIT_EPOCHS,
        frozen_in_main: &[],
    }),
    remark: Some("two stages: an init stage trains the student's feature layers and the connectors on the AB term; the main stage has CE (+ KD) only"),
    connectors,
    ..SPEC_DEFAULTS
};

/// Identity when channels and size match, else conv + BN (FitNet's regressor without ReLU).
fn connectors(
    teacher: &TensorInfo,
    student: &TensorInfo,
    _options: &OptionValues,
) -> Result<Vec<Connector>> {
    if chw(teacher)? == chw(student)? {
        return Ok(Vec::new());
    }
    let (t_c, _, _) = chw(teacher)?;
    let mut layers = size_matching_conv(teacher, student)?;
    layers.push(Layer::BatchNorm { channels: t_c });
    Ok(vec![Connector {
        name: "connector",
        side: Side::Student,
        layers,
    }])
}

/// Init stage: `sum_i 2^(i-n+1) * l_i / B * 3/1000` with
/// `l_i = sum[(s+m)^2 1{s > -m, t <= 0} + (s-m)^2 1{s <= m, t > 0}]`. The main stage has no AB term.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    if ctx.stage == TrainingStage::Main {
        return Ok(None);
    }
    let n = pairs.len();
    let mut terms = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        let s = ctx.tap(pair, Side::Student);
        let t = ctx.tap(pair, Side::Teacher);
        let base = ctx.name(&pair.stage);
        let b = &mut *ctx.b;
        let m = b.scalar(&format!("{base}/margin"), MARGIN);
        let minus_m = b.scalar(&format!("{base}/minus_margin"), -MARGIN);
        let zero = b.scalar(&format!("{base}/zero"), 0.0);
        let teacher_on = b.binary("Greater", &t, &zero, &format!("{base}/teacher_on"));
        let teacher_off = b.unary("Not", &teacher_on, &format!("{base}/teacher_off"));
        let above_minus = b.binary(
            "Greater",
            &s,
            &minus_m,
            &format!("{base}/student_above_minus_m"),
        );
        let above_plus = b.binary("Greater", &s, &m, &format!("{base}/student_above_m"));
        let below_plus = b.unary("Not", &above_plus, &format!("{base}/student_at_most_m"));
        let wrongly_on = b.binary(
            "And",
            &above_minus,
            &teacher_off,
            &format!("{base}/wrongly_on"),
        );
        let wrongly_off = b.binary(
            "And",
            &below_plus,
            &teacher_on,
            &format!("{base}/wrongly_off"),
        );
        let on_mask = b.mask(&wrongly_on, &format!("{base}/wrongly_on_mask"));
        let off_mask = b.mask(&wrongly_off, &format!("{base}/wrongly_off_mask"));
        let s_plus = b.add(&s, &m, &format!("{base}/s_plus_m"));
        let s_minus = b.sub(&s, &m, &format!("{base}/s_minus_m"));
        let on_sq = b.square(&s_plus, &format!("{base}/s_plus_m_squared"));
        let off_sq = b.square(&s_minus, &format!("{base}/s_minus_m_squared"));
        let on_part = b.mul(&on_sq, &on_mask, &format!("{base}/on_part"));
        let off_part = b.mul(&off_sq, &off_mask, &format!("{base}/off_part"));
        let both = b.add(&on_part, &off_part, &format!("{base}/both"));
        let total = b.sum_all(&both, &format!("{base}/sum"));
        let weight = b.scalar(
            &format!("{base}/stage_weight"),
            2f32.powi(i as i32 + 1 - n as i32) * SCALE,
        );
        terms.push(b.mul(&total, &weight, &format!("{base}/weighted")));
    }
    Ok(Some(ctx.per_sample_sum(&terms)))
}
