//! The gradient all-reduce of parameters on the host ([`super::all_reduce_grads`] on the CPU).
//!
//! A large f32 gradient that owns its storage (contiguous from offset 0, shared with no other
//! gradient) is summed where it lies: it is the send buffer of the collective, the sum lands in a
//! small persistent receive buffer, and the mean is written back into the gradient's own storage
//! (a [`candle::InplaceOp1`]). No flattening copy, no fresh allocation (and page faults) per
//! step, no send-side copy in the transport. The other gradients (small ones, views sharing one
//! storage, other dtypes, absent ones) travel together in one packed buffer with a presence flag
//! per parameter, so that a parameter no rank has a gradient for stays without one.
//!
//! Every rank must issue the same collectives in the same order, so which gradients go in place
//! is agreed first: one small all-reduce of per-parameter flags, skipped (on every rank alike)
//! when no parameter is large enough.

use std::cell::RefCell;
use std::collections::HashMap;

use candle::backprop::GradStore;
use candle::{CpuStorage, DType, Layout, Storage, Tensor, Var};

use super::Collective;
use crate::error::{Result, TrainError};

/// Smallest gradient (elements, 4 KiB) summed in place; smaller ones (LayerNorm and bias
/// vectors) are cheaper to pack into one collective than to send one by one.
pub(super) const IN_PLACE_MIN: usize = 1 << 10;

/// Largest piece (elements) of an in-place gradient handed to one collective call: the size of
/// the receive buffer (16 MiB), whatever the size of the largest parameter.
const PIECE: usize = 1 << 22;

thread_local! {
    /// The packed buffer (gradients that are not summed in place, then their presence flags),
    /// kept from step to step so that its pages are faulted in once.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The receive buffer of the in-place sums, kept likewise.
    static RECV: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Sum the gradients of `vars` over the ranks and divide by the world size, on the host.
pub(super) fn all_reduce_grads_host(
    world: &dyn Collective,
    grads: &mut GradStore,
    vars: &[Var],
) -> Result<()> {
    reduce(world, grads, vars, IN_PLACE_MIN)
}

/// [`all_reduce_grads_host`] with gradients of at least `min_in_place` elements summed in place.
fn reduce(
    world: &dyn Collective,
    grads: &mut GradStore,
    vars: &[Var],
    min_in_place: usize,
) -> Result<()> {
    let in_place = agree_in_place(world, grads, vars, min_in_place)?;
    // The packed gradients first: a packed view is copied before any storage changes.
    PACKED.with(|buf| reduce_packed(world, grads, vars, &in_place, &mut buf.borrow_mut()))?;
    let scale = mean_scale(world);
    RECV.with(|recv| {
        let mean = MeanInPlace {
            world,
            scale,
            recv,
            failure: RefCell::new(None),
        };
        for (v, _) in vars.iter().zip(&in_place).filter(|(_, p)| **p) {
            let g = grads.get(v.as_tensor()).ok_or_else(|| {
                TrainError::Config("gradient all-reduce: an agreed gradient is missing".into())
            })?;
            if let Err(e) = g.inplace_op1(&mean) {
                return Err(mean.failure.take().unwrap_or(e.into()));
            }
        }
        Ok(())
    })
}

/// `1/n` as the mean's factor (the arithmetic of `affine(1/n, 0)` in f32: bit-identical means).
fn mean_scale(world: &dyn Collective) -> f32 {
    (1.0 / world.size() as f64) as f32
}

/// Which gradients every rank sums in place: those that are candidates
/// ([`in_place_candidates`]) on all ranks.
fn agree_in_place(
    world: &dyn Collective,
    grads: &GradStore,
    vars: &[Var],
    min_in_place: usize,
) -> Result<Vec<bool>> {
    if vars.iter().all(|v| v.elem_count() < min_in_place) {
        return Ok(vec![false; vars.len()]);
    }
    let mut votes: Vec<f32> = in_place_candidates(grads, vars, min_in_place)
        .into_iter()
        .map(|c| if c { 1.0 } else { 0.0 })
        .collect();
    world.all_reduce_sum_f32("gradient all-reduce (layout)", &mut votes)?;
    let all = world.size() as f32;
    Ok(votes.into_iter().map(|v| v == all).collect())
}

/// Per parameter: whether its gradient can be summed in its own storage on this rank: present,
/// f32 on the host, at least `min_len` elements, contiguous over its whole storage, and that
/// storage shared with no other gradient of `grads` (candle's backward hands the same storage to
/// both operands of an addition, and views of one tensor to the parts of a concatenation).
fn in_place_candidates(grads: &GradStore, vars: &[Var], min_len: usize) -> Vec<bool> {
    let mut users: HashMap<usize, usize> = HashMap::new();
    for id in grads.get_ids() {
        if let Some(addr) = grads.get_id(*id).and_then(|g| f32_storage(g).map(|s| s.0)) {
            *users.entry(addr).or_default() += 1;
        }
    }
    vars.iter()
        .map(|v| {
            let Some(g) = grads.get(v.as_tensor()) else {
                return false;
            };
            match f32_storage(g) {
                Some((addr, whole)) => whole && g.elem_count() >= min_len && users[&addr] == 1,
                None => false,
            }
        })
        .collect()
}

/// The address of `t`'s f32 host storage, and whether `t` covers all of it contiguously.
fn f32_storage(t: &Tensor) -> Option<(usize, bool)> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => {
            let whole = layout.contiguous_offsets() == Some((0, data.len()));
            Some((data.as_ptr() as usize, whole))
        }
        _ => None,
    }
}

/// The gradients not summed in place: copied into `buf` (zeros for an absent one), presence
/// flags at its end, summed in one collective, and their means written into new tensors.
fn reduce_packed(
    world: &dyn Collective,
    grads: &mut GradStore,
    vars: &[Var],
    in_place: &[bool],
    buf: &mut Vec<f32>,
) -> Result<()> {
    let packed: Vec<&Var> = vars
        .iter()
        .zip(in_place)
        .filter(|(_, p)| !**p)
        .map(|(v, _)| v)
        .collect();
    if packed.is_empty() {
        return Ok(());
    }
    let total: usize = packed.iter().map(|v| v.elem_count()).sum();
    buf.resize(total + packed.len(), 0.0);
    let (values, flags) = buf.split_at_mut(total);
    let mut offset = 0;
    for (i, v) in packed.iter().enumerate() {
        let dst = &mut values[offset..offset + v.elem_count()];
        pack_one(grads.get(v.as_tensor()), dst, &mut flags[i])?;
        offset += v.elem_count();
    }
    world.all_reduce_sum_f32("gradient all-reduce", buf)?;
    let scale = mean_scale(world);
    let mut offset = 0;
    for (i, v) in packed.iter().enumerate() {
        let len = v.elem_count();
        if buf[total + i] > 0.0 {
            let mean: Vec<f32> = buf[offset..offset + len]
                .iter()
                .map(|x| x * scale + 0.0)
                .collect();
            let g = Tensor::from_vec(mean, v.shape(), v.device())?.to_dtype(v.dtype())?;
            grads.insert(v.as_tensor(), g);
        } else {
            grads.remove(v.as_tensor());
        }
        offset += len;
    }
    Ok(())
}

/// Copy `grad` (or zeros when absent) into `dst` and set its presence `flag`.
fn pack_one(grad: Option<&Tensor>, dst: &mut [f32], flag: &mut f32) -> Result<()> {
    match grad {
        Some(g) => {
            copy_into_f32(g, dst)?;
            *flag = 1.0;
        }
        None => {
            dst.fill(0.0);
            *flag = 0.0;
        }
    }
    Ok(())
}

/// Copy `t` (any dtype, any layout, on the host) into `dst`, flattened, as f32.
fn copy_into_f32(t: &Tensor, dst: &mut [f32]) -> Result<()> {
    let t = t.to_dtype(DType::F32)?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => {
            dst.copy_from_slice(&cpu.as_slice::<f32>()?[start..end]);
        }
        _ => {
            drop(storage);
            dst.copy_from_slice(&t.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(())
}

/// The in-place sum and mean of one gradient, piece by piece through `recv`.
struct MeanInPlace<'a> {
    world: &'a dyn Collective,
    scale: f32,
    recv: &'a RefCell<Vec<f32>>,
    /// The collective's own error, kept whole (candle's op can only return a candle error).
    failure: RefCell<Option<TrainError>>,
}

impl candle::InplaceOp1 for MeanInPlace<'_> {
    fn name(&self) -> &'static str {
        "gradient-mean-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle::bail!("gradient all-reduce: an in-place gradient is not f32");
        };
        if layout.contiguous_offsets() != Some((0, data.len())) {
            candle::bail!("gradient all-reduce: an in-place gradient does not cover its storage");
        }
        let mut recv = self.recv.borrow_mut();
        for piece in data.chunks_mut(PIECE) {
            if recv.len() < piece.len() {
                recv.resize(piece.len(), 0.0);
            }
            let sum = &mut recv[..piece.len()];
            if let Err(e) = self
                .world
                .all_reduce_sum_f32_to("gradient all-reduce", piece, sum)
            {
                let msg = e.to_string();
                *self.failure.borrow_mut() = Some(e);
                candle::bail!("{msg}");
            }
            for (g, s) in piece.iter_mut().zip(sum.iter()) {
                *g = s * self.scale + 0.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Two ranks where the other one always holds this rank's values plus one: a sum is
    /// `2x + 1`, a mean `x + 0.5`; a gradient summed twice would show `x + 0.75`.
    #[derive(Default)]
    struct PlusOne {
        reduces: AtomicUsize,
    }

    impl Collective for PlusOne {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn local_rank(&self) -> usize {
            0
        }
        fn backend(&self) -> &'static str {
            "plus-one"
        }
        fn all_reduce_sum_f32(&self, what: &str, buf: &mut [f32]) -> Result<()> {
            if what.contains("layout") {
                buf.iter_mut().for_each(|x| *x *= 2.0); // the other rank votes alike
                return Ok(());
            }
            self.reduces.fetch_add(1, Ordering::SeqCst);
            buf.iter_mut().for_each(|x| *x = 2.0 * *x + 1.0);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _: &str, _: &mut [f64]) -> Result<()> {
            unimplemented!("not used by the gradient all-reduce")
        }
        fn broadcast_f32(&self, _: &str, _: &mut [f32]) -> Result<()> {
            unimplemented!("not used by the gradient all-reduce")
        }
        fn broadcast_f64(&self, _: &str, _: &mut [f64]) -> Result<()> {
            unimplemented!("not used by the gradient all-reduce")
        }
        fn barrier(&self, _: &str) -> Result<()> {
            Ok(())
        }
    }

    fn values(grads: &GradStore, v: &Var) -> Vec<f32> {
        grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn every_gradient_is_averaged_once_whether_in_place_shared_or_absent_here() {
        let dev = Device::Cpu;
        let a = Var::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap(); // own storage: in place
        let b = Var::new(&[5f32, 6., 7.], &dev).unwrap(); // b and c: one shared gradient
        let c = Var::new(&[1f32, 1., 1.], &dev).unwrap();
        let d = Var::new(&[0f32; 3], &dev).unwrap(); // no gradient on this rank
        let loss = ((a.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
            + (b.as_tensor() + c.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let mut grads = loss.backward().unwrap();
        let vars = [a.clone(), b.clone(), c.clone(), d.clone()];
        assert_eq!(
            in_place_candidates(&grads, &vars, 1),
            [true, false, false, false]
        );
        let a_storage = f32_storage(grads.get(a.as_tensor()).unwrap()).unwrap().0;
        let before: Vec<Vec<f32>> = vars[..3].iter().map(|v| values(&grads, v)).collect();
        let world = PlusOne::default();
        reduce(&world, &mut grads, &vars, 1).unwrap();
        for (v, old) in vars[..3].iter().zip(&before) {
            let want: Vec<f32> = old.iter().map(|x| x + 0.5).collect();
            assert_eq!(values(&grads, v), want);
        }
        // d has no gradient here but one of ones on the other rank (zeros + 1): the mean.
        assert_eq!(values(&grads, &d), [0.5; 3]);
        let a_after = f32_storage(grads.get(a.as_tensor()).unwrap()).unwrap().0;
        assert_eq!(
            a_after, a_storage,
            "a's gradient was summed in its own storage"
        );
        assert_eq!(
            world.reduces.load(Ordering::SeqCst),
            2,
            "a in place, b and c packed"
        );
    }

    #[test]
    fn a_large_gradient_is_summed_piece_by_piece() {
        let dev = Device::Cpu;
        let n = PIECE + 3;
        let a = Var::from_tensor(&Tensor::ones(n, DType::F32, &dev).unwrap()).unwrap();
        let loss = a.as_tensor().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        let world = PlusOne::default();
        reduce(&world, &mut grads, std::slice::from_ref(&a), IN_PLACE_MIN).unwrap();
        assert!(values(&grads, &a).iter().all(|x| *x == 1.5));
        assert_eq!(
            world.reduces.load(Ordering::SeqCst),
            2,
            "two pieces, nothing packed"
        );
    }
}
