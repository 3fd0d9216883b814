//! The fourteen distillation methods: one file each, holding the method's spec (taps, weights,
//! options, stages, connectors) and its loss builder, and one registry that lists them.

mod ab;
mod at;
mod cc;
mod crd;
mod fitnet;
mod fsp;
mod ft;
mod kd;
mod nst;
mod ofd;
mod pkt;
mod rkd;
mod sp;
mod vid;

mod context;
mod init;

use crate::error::Result;
use crate::plan::{MethodName, MethodSpec, TapPair};
pub use context::{LossContext, TEACHER_PREFIX};

/// Adds a method's unweighted loss term for `ctx.stage` over its pairs and returns the scalar
/// tensor, or None where that stage has no term of this method.
pub type BuildFn = fn(&mut LossContext, &[&TapPair]) -> Result<Option<String>>;

/// A method: what it declares and how its loss is built.
pub struct Registered {
    pub spec: &'static MethodSpec,
    pub build: BuildFn,
}

/// The reference's number of init-stage epochs (AB, FSP, FT: RepDistiller's `init_epochs`).
const INIT_EPOCHS: u32 = 30;

/// Every method kdgraph has, in the order help and errors list them. A new method is a new file
/// and one line here.
pub static REGISTRY: &[Registered] = &[
    Registered {
        spec: &kd::SPEC,
        build: kd::build,
    },
    Registered {
        spec: &fitnet::SPEC,
        build: fitnet::build,
    },
    Registered {
        spec: &at::SPEC,
        build: at::build,
    },
    Registered {
        spec: &sp::SPEC,
        build: sp::build,
    },
    Registered {
        spec: &cc::SPEC,
        build: cc::build,
    },
    Registered {
        spec: &vid::SPEC,
        build: vid::build,
    },
    Registered {
        spec: &rkd::SPEC,
        build: rkd::build,
    },
    Registered {
        spec: &pkt::SPEC,
        build: pkt::build,
    },
    Registered {
        spec: &ab::SPEC,
        build: ab::build,
    },
    Registered {
        spec: &ft::SPEC,
        build: ft::build,
    },
    Registered {
        spec: &fsp::SPEC,
        build: fsp::build,
    },
    Registered {
        spec: &nst::SPEC,
        build: nst::build,
    },
    Registered {
        spec: &crd::SPEC,
        build: crd::build,
    },
    Registered {
        spec: &ofd::SPEC,
        build: ofd::build,
    },
];

/// Every method, as the planner takes them.
pub fn all() -> Vec<MethodName> {
    REGISTRY.iter().map(|r| MethodName(r.spec)).collect()
}

/// The loss builder of a method.
pub fn builder(method: MethodName) -> BuildFn {
    REGISTRY
        .iter()
        .find(|r| r.spec.id == method.as_str())
        .map(|r| r.build)
        .expect("every MethodName comes from the registry")
}
