//! The optimizers' updates as ONNX operators, each exactly torch.optim's single-tensor update:
//! AdamW (decoupled weight decay, bias correction from the step count) and SGD (momentum with
//! dampening 0, optional Nesterov, L2 weight decay added to the gradient).

use serde::Serialize;

use super::{LR, STEP};
use crate::onnx::builder::{Attr, GraphBuilder};

/// An optimizer and its hyper-parameters (the learning rate is a graph input).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Optimizer {
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
    Sgd {
        momentum: f32,
        nesterov: bool,
        weight_decay: f32,
    },
}

/// Scalars every parameter's update shares, computed once per step.
pub struct Schedule {
    /// AdamW: 1 - lr * weight_decay. SGD: -lr.
    first: String,
    /// AdamW: lr / (1 - beta1^step). SGD: unused.
    second: Option<String>,
    /// AdamW: 1 / sqrt(1 - beta2^step).
    third: Option<String>,
}

/// One parameter's update: its new value and (moment input, moment output) pairs.
pub struct Update {
    pub parameter: String,
    pub moments: Vec<(String, String)>,
}

impl Optimizer {
    /// Whether the graph needs the step count (AdamW's bias correction).
    pub fn needs_step(&self) -> bool {
        matches!(self, Optimizer::AdamW { .. })
    }

    /// The shared scalars of one step.
    pub fn schedule(&self, b: &mut GraphBuilder) -> Schedule {
        match *self {
            Optimizer::AdamW {
                beta1,
                beta2,
                weight_decay,
                ..
            } => {
                let decay = b.scalar("step/weight_decay", weight_decay);
                let lr_decay = b.mul(LR, &decay, "step/lr_decay");
                let one = b.scalar("step/one", 1.0);
                let keep = b.sub(&one, &lr_decay, "step/decay_factor");
                let t = b.op("Cast", &[STEP], vec![("to", Attr::Int(1))], "step/t");
                let correction = |b: &mut GraphBuilder, beta: f32, name: &str| {
                    let beta = b.scalar(&format!("step/{name}"), beta);
                    let power = b.binary("Pow", &beta, &t, &format!("step/{name}_power"));
                    b.sub(&one, &power, &format!("step/{name}_correction"))
                };
                let bc1 = correction(b, beta1, "beta1");
                let bc2 = correction(b, beta2, "beta2");
                let step_size = b.div(LR, &bc1, "step/step_size");
                let root = b.unary("Sqrt", &bc2, "step/beta2_correction_sqrt");
                let inverse_root = b.unary("Reciprocal", &root, "step/beta2_correction_rsqrt");
                Schedule {
                    first: keep,
                    second: Some(step_size),
                    third: Some(inverse_root),
                }
            }
            Optimizer::Sgd { .. } => {
                let descent = b.unary("Neg", LR, "step/minus_lr");
                Schedule {
                    first: descent,
                    second: None,
                    third: None,
                }
            }
        }
    }

    /// The update of `parameter` from its gradient `gradient`.
    pub fn update(
        &self,
        b: &mut GraphBuilder,
        s: &Schedule,
        parameter: &str,
        gradient: &str,
    ) -> Update {
        let name = format!("step/{parameter}");
        match *self {
            Optimizer::AdamW {
                beta1, beta2, eps, ..
            } => {
                let (m, v) = (
                    format!("{parameter}.exp_avg"),
                    format!("{parameter}.exp_avg_sq"),
                );
                let decayed = b.mul(parameter, &s.first, &format!("{name}/decayed"));
                // exp_avg.lerp_(grad, 1 - beta1)
                let towards = b.sub(gradient, &m, &format!("{name}/grad_minus_m"));
                let weight = b.scalar(&format!("{name}/one_minus_beta1"), 1.0 - beta1);
                let moved = b.mul(&towards, &weight, &format!("{name}/m_step"));
                let m_next = b.unique(&format!("{m}_next"));
                b.node("Add", &[&m, &moved], &[&m_next], vec![], &m_next);
                // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                let beta2_c = b.scalar(&format!("{name}/beta2"), beta2);
                let kept = b.mul(&v, &beta2_c, &format!("{name}/v_kept"));
                let squared = b.square(gradient, &format!("{name}/grad_sq"));
                let weight2 = b.scalar(&format!("{name}/one_minus_beta2"), 1.0 - beta2);
                let added = b.mul(&squared, &weight2, &format!("{name}/v_step"));
                let v_next = b.unique(&format!("{v}_next"));
                b.node("Add", &[&kept, &added], &[&v_next], vec![], &v_next);
                // denom = sqrt(v) / sqrt(bias_correction2) + eps; p -= step_size * m / denom
                let root = b.unary("Sqrt", &v_next, &format!("{name}/v_sqrt"));
                let scaled = b.mul(
                    &root,
                    s.third.as_deref().expect("AdamW's schedule"),
                    &format!("{name}/v_hat_sqrt"),
                );
                let eps = b.scalar(&format!("{name}/eps"), eps);
                let denom = b.add(&scaled, &eps, &format!("{name}/denom"));
                let ratio = b.div(&m_next, &denom, &format!("{name}/ratio"));
                let change = b.mul(
                    &ratio,
                    s.second.as_deref().expect("AdamW's schedule"),
                    &format!("{name}/change"),
                );
                let parameter = b.sub(&decayed, &change, &format!("{name}/updated"));
                Update {
                    parameter,
                    moments: vec![(m, m_next), (v, v_next)],
                }
            }
            Optimizer::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                let mut direction = gradient.to_string();
                if weight_decay != 0.0 {
                    let decay = b.scalar(&format!("{name}/weight_decay"), weight_decay);
                    let l2 = b.mul(parameter, &decay, &format!("{name}/l2"));
                    direction = b.add(&direction, &l2, &format!("{name}/grad_l2"));
                }
                let mut moments = Vec::new();
                if momentum != 0.0 {
                    // buf = momentum * buf + grad (dampening 0; a zero buffer gives torch's first step)
                    let buffer = format!("{parameter}.momentum_buffer");
                    let mu = b.scalar(&format!("{name}/momentum"), momentum);
                    let kept = b.mul(&buffer, &mu, &format!("{name}/buf_kept"));
                    let buffer_next = b.unique(&format!("{buffer}_next"));
                    b.node(
                        "Add",
                        &[&kept, &direction],
                        &[&buffer_next],
                        vec![],
                        &buffer_next,
                    );
                    direction = if nesterov {
                        let ahead = b.mul(&buffer_next, &mu, &format!("{name}/nesterov"));
                        b.add(&direction, &ahead, &format!("{name}/nesterov_grad"))
                    } else {
                        buffer_next.clone()
                    };
                    moments.push((buffer, buffer_next));
                }
                let change = b.mul(&direction, &s.first, &format!("{name}/change"));
                let parameter = b.add(parameter, &change, &format!("{name}/updated"));
                Update { parameter, moments }
            }
        }
    }
}
