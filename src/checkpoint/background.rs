//! Checkpoint uploads off the training thread. A job (write a checkpoint with the commit protocol,
//! move the pointers, apply retention, sync the metrics) runs on a thread of its own with a store
//! client of its own, while training goes on from a copy of the state in host memory. One job is
//! in flight at a time: the next waits for it, so checkpoints commit in step order and host memory
//! holds at most two copies of the state.

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};

use super::CheckpointStore;

/// What an upload does with the store.
pub type Job = Box<dyn FnOnce(&CheckpointStore) -> Result<()> + Send>;

pub struct Uploads {
    store: Arc<CheckpointStore>,
    in_flight: Option<JoinHandle<Result<()>>>,
}

impl Uploads {
    /// Uploads to `location` (opened again: the trainer's client stays free for its own reads).
    pub fn open(location: &str) -> Result<Self> {
        Ok(Self { store: Arc::new(CheckpointStore::open(location)?), in_flight: None })
    }

    /// Starts `job` once the upload in flight has finished; that upload's error, if it failed.
    pub fn start(&mut self, job: Job) -> Result<()> {
        self.wait()?;
        let store = Arc::clone(&self.store);
        let thread = std::thread::Builder::new().name("kdmcse-upload".into()).spawn(move || {
            lower_this_threads_priority();
            job(&store)
        })?;
        self.in_flight = Some(thread);
        Ok(())
    }

    /// The error of the upload in flight if it has failed by now; Ok while it runs or once it
    /// has committed.
    pub fn check(&mut self) -> Result<()> {
        match &self.in_flight {
            Some(thread) if thread.is_finished() => self.wait(),
            _ => Ok(()),
        }
    }

    /// Waits for the upload in flight, if any; its error, if it failed.
    pub fn wait(&mut self) -> Result<()> {
        match self.in_flight.take() {
            None => Ok(()),
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow!("it panicked"))
                .and_then(|result| result)
                .context("the background checkpoint upload failed"),
        }
    }
}

/// How much the upload thread yields to training (Linux nice, 0-19).
const UPLOAD_NICENESS: libc::c_int = 10;

/// Lets training threads win the CPU over the upload: hashing and sending a checkpoint must not
/// slow the steps it overlaps (on Linux a thread has a nice value of its own).
fn lower_this_threads_priority() {
    // SAFETY: gettid and setpriority on this thread's id have no memory effects; a failure
    // leaves the thread as it was.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, UPLOAD_NICENESS) };
}

impl Drop for Uploads {
    /// A run that fails still lets the upload in flight commit: its state is whole (copied at its
    /// step), and a resume then loses fewer steps.
    fn drop(&mut self) {
        if self.in_flight.is_some() {
            tracing::info!("waiting for the checkpoint upload in flight");
            if let Err(err) = self.wait() {
                tracing::error!("the checkpoint upload in flight failed: {err:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn one_upload_at_a_time_in_order_and_failures_surface() {
        let dir = tempfile::tempdir().unwrap();
        let mut uploads = Uploads::open(dir.path().to_str().unwrap()).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        for i in 0..3 {
            let (running, order) = (Arc::clone(&running), Arc::clone(&order));
            uploads
                .start(Box::new(move |store| {
                    assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0, "two uploads at once");
                    std::thread::sleep(Duration::from_millis(50));
                    store.put_file(&format!("f{i}"), bytes::Bytes::from(vec![i as u8]))?;
                    order.lock().unwrap().push(i);
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }))
                .unwrap();
        }
        uploads.wait().unwrap();
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        assert!(dir.path().join("f2").is_file());

        uploads.start(Box::new(|_| anyhow::bail!("the store is down"))).unwrap();
        let failed = loop {
            match uploads.check() {
                Err(err) => break err,
                Ok(()) if uploads.in_flight.is_none() => panic!("the failure was lost"),
                Ok(()) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        assert_eq!(format!("{failed:#}"), "the background checkpoint upload failed: the store is down");
        uploads.check().unwrap();
    }
}
