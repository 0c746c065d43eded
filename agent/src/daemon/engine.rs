//! The engine side of the daemon: each loaded model runs on its own thread, fed by a
//! bounded queue. Handlers never touch a model; they send a [`Job`] and read its events.
//!
//! A model is retired by dropping the last [`ModelWorker`] handle: the thread finishes the
//! jobs already queued, then exits and frees the model (and the blob it holds open).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use outpost_engine::registry::ModelRecord;
use outpost_engine::{EngineError, Event, GenerateParams, Generation, LoadedModel, ModelLease};
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;

/// What to generate from.
pub use outpost_engine::Prompt as Input;

/// One token with its log-probability, as the API reports it.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What a job reports, in order: `Started` (or `Failed`), then tokens and text, then `Done`
/// (or `Failed`).
#[derive(Debug)]
pub enum JobEvent {
    Started { prompt_tokens: usize },
    Token(TokenInfo),
    Text(String),
    Done(Box<Generation>),
    Failed(EngineError),
}

#[derive(Debug)]
pub struct Job {
    pub input: Input,
    pub params: GenerateParams,
    pub events: UnboundedSender<JobEvent>,
    /// Set when the client goes away or the daemon gives up waiting at shutdown.
    pub cancel: Arc<AtomicBool>,
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum Rejected {
    /// The queue is full: come back later.
    Busy,
    /// The engine thread is gone (it panicked).
    Gone,
}

/// A handle on a loaded model's engine thread.
#[derive(Debug)]
pub struct ModelWorker {
    pub record: ModelRecord,
    pub context_length: usize,
    pub vocab_size: usize,
    pub load_ms: u64,
    queue: SyncSender<Job>,
    /// Jobs waiting (not the one running).
    depth: Arc<AtomicUsize>,
    /// Cancel flags of queued and running jobs, for shutdown.
    live: Mutex<Vec<Arc<AtomicBool>>>,
}

impl ModelWorker {
    /// Starts the engine thread for an already loaded model; the lease (and with it the
    /// blob's shared lock) lives as long as the thread.
    pub fn start(
        lease: ModelLease,
        queue_length: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = sync_channel(queue_length);
        let depth = Arc::new(AtomicUsize::new(0));
        let worker = Arc::new(Self {
            context_length: lease.model.context_length,
            vocab_size: lease.model.vocab_size(),
            load_ms: lease.model.load_ms,
            record: lease.record.clone(),
            queue: tx,
            depth: depth.clone(),
            live: Mutex::new(Vec::new()),
        });
        let name = format!("engine-{}", worker.record.label());
        std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let mut lease = lease;
                run(&mut lease.model, rx, &depth, &metrics);
                drop(lease);
                // The model's memory is free now: give it back, not just to the allocator.
                crate::sys::release_free_memory();
            })?;
        Ok(worker)
    }

    /// Queues a job, or says why not; never waits.
    pub fn submit(&self, job: Job) -> Result<(), Rejected> {
        if let Ok(mut live) = self.live.lock() {
            // A flag no request holds any more belongs to a request that has ended.
            live.retain(|c| Arc::strong_count(c) > 1);
            live.push(job.cancel.clone());
        }
        self.depth.fetch_add(1, Ordering::SeqCst);
        self.queue.try_send(job).map_err(|e| {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => Rejected::Busy,
                TrySendError::Disconnected(_) => Rejected::Gone,
            }
        })
    }

    /// Jobs waiting in the queue.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Cancels every queued and running job (at the end of the shutdown grace period).
    pub fn cancel_all(&self) {
        if let Ok(live) = self.live.lock() {
            for c in live.iter() {
                c.store(true, Ordering::SeqCst);
            }
        }
    }
}

fn run(model: &mut LoadedModel, rx: Receiver<Job>, depth: &AtomicUsize, metrics: &Metrics) {
    // Ends when every sender is gone: the model was swapped out and its last request is done.
    while let Ok(job) = rx.recv() {
        depth.fetch_sub(1, Ordering::SeqCst);
        // A client that left while its job waited costs nothing.
        if !job.cancel.load(Ordering::SeqCst) {
            run_job(model, &job, metrics);
            // An idle engine holds the weights, not the last request's KV cache and scratch.
            model.clear_cache();
            crate::sys::release_free_memory();
        }
    }
}

fn run_job(model: &mut LoadedModel, job: &Job, metrics: &Metrics) {
    let send = |e: JobEvent| {
        if job.events.send(e).is_err() {
            // Nobody reads any more: the client went away.
            job.cancel.store(true, Ordering::SeqCst);
        }
    };
    let prompt = match model.prompt_ids(&job.input) {
        Ok(p) => p,
        Err(e) => return send(JobEvent::Failed(e)),
    };
    send(JobEvent::Started {
        prompt_tokens: prompt.len(),
    });
    let started = Instant::now();
    let result = model.generate_with(
        &prompt,
        &job.params,
        &mut |event| match event {
            Event::Token {
                text, logprob, top, ..
            } => {
                if let Some(logprob) = logprob {
                    send(JobEvent::Token(TokenInfo {
                        text: text.to_string(),
                        logprob,
                        top: top
                            .unwrap_or_default()
                            .iter()
                            .map(|t| (t.text.clone(), t.logprob))
                            .collect(),
                    }));
                }
            }
            Event::Text(t) => send(JobEvent::Text(t.to_string())),
        },
        &job.cancel,
    );
    match result {
        Ok(g) => {
            metrics.record_generation(prompt.len(), &g, started.elapsed());
            send(JobEvent::Done(Box::new(g)));
        }
        Err(e) => send(JobEvent::Failed(e)),
    }
}
