//! FT (factor transfer, RepDistiller form): a paraphraser trained on the teacher's last map in an
//! init stage, a translator on the student's; L1 between normalised factors.

use super::LossContext;
use crate::analysis::TensorInfo;
use crate::error::Result;
use crate::plan::connector::{chw, conv};
use crate::plan::{
    Connector, InitStage, Layer, MethodSpec, OptionValues, Side, TapKind, TapPair, TrainingStage,
    Weights, SPEC_DEFAULTS,
};

const SLOPE: f64 = 0.1;

pub static SPEC: MethodSpec = MethodSpec {
    id: "ft",
    taps: TapKind::LastSpatial,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 200.0,
    },
    pools: true,
    init_stage: Some(InitStage {
        epochs: super::INIT_EPOCHS,
        frozen_in_main: &["paraphraser"],
    }),
    remark: Some("two stages: an init stage trains the paraphraser (with a decoder) to reconstruct the teacher map; the main stage freezes it and trains the translator"),
    connectors,
    ..SPEC_DEFAULTS
};

/// The paraphraser's encoder (teacher side; its decoder exists in the init stage only) and
/// the translator (student side).
fn connectors(
    teacher: &TensorInfo,
    student: &TensorInfo,
    _options: &OptionValues,
) -> Result<Vec<Connector>> {
    let (t_c, _, _) = chw(teacher)?;
    let (s_c, _, _) = chw(student)?;
    let leaky = || Layer::LeakyRelu { slope: SLOPE };
    let factor = t_c / 2;
    let encoder = vec![
        conv(t_c, t_c, 3, 1, true),
        leaky(),
        conv(t_c, factor, 3, 1, true),
        leaky(),
        conv(factor, factor, 3, 1, true),
        leaky(),
    ];
    let translator = vec![
        conv(s_c, s_c, 3, 1, true),
        Layer::BatchNorm { channels: s_c },
        leaky(),
        conv(s_c, factor, 3, 1, true),
        Layer::BatchNorm { channels: factor },
        leaky(),
        conv(factor, factor, 3, 1, true),
        Layer::BatchNorm { channels: factor },
        leaky(),
    ];
    Ok(vec![
        Connector {
            name: "paraphraser",
            side: Side::Teacher,
            layers: encoder,
        },
        Connector {
            name: "translator",
            side: Side::Student,
            layers: translator,
        },
    ])
}

/// Init stage: `mean((dec(enc(t)) - t)^2)`, training the paraphraser. Main stage: the
/// paraphraser frozen (its trained weights carried in by name),
/// `mean |phi(translator(s)) - phi(enc(t))|` with `phi(x) = N(flatten(mean_c x^2))`.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let pair = pairs[0];
    if ctx.stage == TrainingStage::Init {
        let (t_c, _, _) = chw(&pair.teacher)?;
        let factor = t_c / 2;
        let teacher = ctx.teacher(pair);
        let encoder = pair
            .connectors
            .iter()
            .find(|c| c.side == Side::Teacher)
            .expect("FT has a paraphraser")
            .clone();
        let encoded = ctx.connect(pair, &encoder, &teacher);
        let leaky = || Layer::LeakyRelu { slope: SLOPE };
        let decoder = Connector {
            name: "paraphraser_decoder",
            side: Side::Teacher,
            layers: vec![
                conv(factor, factor, 3, 1, true),
                leaky(),
                conv(factor, t_c, 3, 1, true),
                leaky(),
                conv(t_c, t_c, 3, 1, true),
                leaky(),
            ],
        };
        let decoded = ctx.connect(pair, &decoder, &encoded);
        // The teacher map itself (tap_chw would give the paraphraser's factor).
        let (c, h, w) = chw(&pair.teacher)?;
        let name = ctx.name("reconstruction");
        return Ok(Some(ctx.b.mse_staged(
            &decoded,
            &teacher,
            &[c, h, w],
            &name,
        )));
    }
    let mut factors = Vec::new();
    for side in [Side::Student, Side::Teacher] {
        let f = ctx.tap(pair, side);
        let base = ctx.name(&format!("{}/{side}_factor", pair.stage));
        factors.push(ctx.b.attention_map(&f, &base));
    }
    let b = &mut *ctx.b;
    let diff = b.sub(&factors[0], &factors[1], "kd/ft/diff");
    let abs = b.unary("Abs", &diff, "kd/ft/abs");
    Ok(Some(b.mean_all(&abs, "kd/ft/term")))
}
