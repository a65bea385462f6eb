//! Time of the gradient all-reduce alone, without waits for slower ranks: `cargo build -p
//! beit-train --features mpi --example allreduce_bench`, then `mpirun -n 2
//! target/debug/examples/allreduce_bench [MILLIONS]` all-reduces a buffer of MILLIONS f32
//! (default 86, ViT-B's parameters) as the engine does (`distributed::all_reduce_grads`: copy into
//! one flat buffer, sum over the ranks, average), after a barrier, five times; rank 0 prints the
//! times. `scripts/bench/allreduce_anchor.sh` runs it alternately with MPI's own in-place
//! all-reduce of the same buffer.

use beit_train::distributed::{self, Collective, MpiWorld};
use candle::{Device, Var};

fn main() -> anyhow::Result<()> {
    let guard = MpiWorld::init()?;
    let world = guard.world();
    let millions: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(86.0);
    let n = (millions * 1e6) as usize;
    // Twelve equal parameters, like a stack of blocks; every one has a gradient.
    let vars: Vec<Var> = (0..12)
        .map(|_| Var::zeros(n / 12, candle::DType::F32, &Device::Cpu))
        .collect::<candle::Result<_>>()?;
    let loss = vars
        .iter()
        .map(|v| v.as_tensor().sum_all())
        .collect::<candle::Result<Vec<_>>>()?
        .into_iter()
        .try_fold(None, |acc: Option<candle::Tensor>, t| {
            Ok::<_, candle::Error>(Some(match acc {
                Some(a) => (a + t)?,
                None => t,
            }))
        })?
        .expect("twelve parameters");
    for rep in 0..5 {
        let mut grads = loss.backward()?;
        world.barrier("bench barrier")?;
        let t0 = std::time::Instant::now();
        distributed::all_reduce_grads(&*world, &mut grads, &vars)?;
        let dt = t0.elapsed().as_secs_f64();
        if world.rank() == 0 {
            println!(
                "rep {rep}: {} ranks, {:.1} M f32 ({:.0} MB): {dt:.3} s",
                world.size(),
                n as f64 / 1e6,
                n as f64 * 4.0 / 1e6
            );
        }
    }
    drop(guard);
    Ok(())
}
