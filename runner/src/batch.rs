//! Continuous batching: many replies generated at once on one shared [`ChatModel`].
//!
//! A [`Batcher`] owns one thread. Before each step it admits waiting requests (up to `parallel`
//! active sequences); each step is one forward pass over the next token of every sequence that is
//! generating plus the next prompt chunk of those still being fed (about [`PROMPT_CHUNK`] prompt
//! tokens per step at most), so new prompts join without stopping the others, and each weight
//! matrix is read once per step (on the CPU path a GEMM over every token of the step). Prompt
//! chunks are cut exactly as [`ChatModel::generate`] cuts them. Each sequence samples with its own [`Decoder`], the
//! same code [`ChatModel::generate`] runs, and the batched logits equal the solo ones, so a
//! request gives the same bytes alone or batched. A sequence whose sink says stop (its client went
//! away) leaves at the next step.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::chat::{
    ChatModel, Decoder, GenerateError, GenerateOptions, Generation, PROMPT_CHUNK, Session, Step,
};

/// What a request's sink receives, in order: text pieces, then exactly one end.
#[derive(Debug)]
pub enum Event<'a> {
    /// The next piece of the reply.
    Text(&'a str),
    /// The reply is complete (or failed); nothing follows.
    Done(Result<Generation, GenerateError>),
}

/// Receives a request's events on the batch thread; returning `Break` from a `Text` cancels it.
pub type Sink = Box<dyn FnMut(Event<'_>) -> ControlFlow<()> + Send>;

/// One request: prompt tokens, generation settings and where its events go.
pub struct Job {
    /// The prompt, tokenized.
    pub prompt: Vec<u32>,
    /// Generation settings (the seed included).
    pub options: GenerateOptions,
    /// Where text and the end go.
    pub sink: Sink,
}

/// The batcher is full: `parallel` sequences active and `queue` waiting.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the server is busy: {active} replies running and {waiting} waiting (the queue's limit)")]
pub struct Busy {
    /// Sequences being generated.
    pub active: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
}

/// Limits of a [`Batcher`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most sequences generated at once (at least 1).
    pub parallel: usize,
    /// Most requests waiting for a slot beyond those.
    pub queue: usize,
}

/// Counts shared between the batch thread and submitters.
#[derive(Debug, Default)]
struct Load {
    /// Requests accepted and not finished (waiting or active).
    accepted: AtomicUsize,
    /// Of those, the ones being generated.
    active: AtomicUsize,
}

/// Generates replies for many requests at once on one model (see the module docs).
pub struct Batcher {
    model: Arc<ChatModel>,
    limits: Limits,
    jobs: Mutex<Option<Sender<Job>>>,
    load: Arc<Load>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("model", &self.model.name())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the batch thread for `model`.
    pub fn new(model: Arc<ChatModel>, limits: Limits) -> Self {
        let limits = Limits {
            parallel: limits.parallel.max(1),
            ..limits
        };
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(Load::default());
        let thread = {
            let (model, load) = (Arc::clone(&model), Arc::clone(&load));
            std::thread::Builder::new()
                .name(format!("batch {}", model.name()))
                .spawn(move || run(&model, limits.parallel, &rx, &load))
                .ok()
        };
        Self {
            model,
            limits,
            jobs: Mutex::new(Some(tx)),
            load,
            thread: Mutex::new(thread),
        }
    }

    /// The model it runs.
    pub fn model(&self) -> &Arc<ChatModel> {
        &self.model
    }

    /// Its limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Requests being generated now.
    pub fn active(&self) -> usize {
        self.load.active.load(Ordering::SeqCst)
    }

    /// Requests accepted and not finished (active and waiting).
    pub fn accepted(&self) -> usize {
        self.load.accepted.load(Ordering::SeqCst)
    }

    /// Queues `job`, or refuses it at once when `parallel + queue` requests are already accepted.
    /// The sink is called on the batch thread.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        let capacity = self.limits.parallel + self.limits.queue;
        let busy = |accepted: usize| {
            let active = self.active();
            Busy {
                active,
                waiting: accepted.saturating_sub(active),
            }
        };
        self.load
            .accepted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < capacity).then_some(n + 1)
            })
            .map_err(busy)?;
        let sent = match &*lock(&self.jobs) {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        };
        if let Err(mut job) = sent {
            // The thread is gone (shut down or failed to start): the request ends here.
            self.load.accepted.fetch_sub(1, Ordering::SeqCst);
            let _ = (job.sink)(Event::Done(Err(GenerateError::Stopped)));
        }
        Ok(())
    }

    /// Stops taking requests, lets the accepted ones finish, and waits for the thread.
    pub fn shutdown(&self) {
        lock(&self.jobs).take();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a sequence stands.
enum Phase {
    /// Prompt tokens `fed..` of `prompt` are still to go in.
    Prompt {
        prompt: Vec<u32>,
        fed: usize,
        started: Instant,
    },
    /// Generating: `next` is the token to feed.
    Decode { next: u32 },
}

/// A sequence being generated.
struct Active {
    session: Session,
    decoder: Decoder,
    phase: Phase,
    sink: Sink,
}

impl Active {
    /// The tokens this sequence feeds in the next step.
    fn tokens(&self) -> &[u32] {
        match &self.phase {
            Phase::Prompt { prompt, fed, .. } => {
                &prompt[*fed..(*fed + PROMPT_CHUNK).min(prompt.len())]
            }
            Phase::Decode { next } => std::slice::from_ref(next),
        }
    }
}

/// The batch thread: admit, step, until the job channel closes and nothing is active.
fn run(model: &ChatModel, parallel: usize, jobs: &Receiver<Job>, load: &Load) {
    let mut active: Vec<Active> = Vec::new();
    let mut work = crate::models::llama::Workspace::default();
    let mut open = true;
    loop {
        while open && active.len() < parallel {
            let job = if active.is_empty() {
                // Idle: wait, but wake now and then so a closed channel is noticed.
                match jobs.recv_timeout(Duration::from_millis(500)) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            load.active.fetch_add(1, Ordering::SeqCst);
            if let Some(seq) = admit(model, job, load) {
                active.push(seq);
            }
        }
        if active.is_empty() {
            if open {
                continue;
            }
            return;
        }
        // Every generating sequence, and prompt chunks up to about one chunk's worth per step
        // (always at least one), so a long prompt does not hold up the others' next token.
        let mut prompt_budget = PROMPT_CHUNK;
        let chosen: Vec<bool> = active
            .iter()
            .map(|seq| match seq.phase {
                Phase::Decode { .. } => true,
                Phase::Prompt { .. } => {
                    let n = seq.tokens().len();
                    let fits = n <= prompt_budget || prompt_budget == PROMPT_CHUNK;
                    if fits {
                        prompt_budget = prompt_budget.saturating_sub(n);
                    }
                    fits
                }
            })
            .collect();
        let tokens: Vec<Vec<u32>> = active
            .iter()
            .zip(&chosen)
            .filter(|(_, c)| **c)
            .map(|(seq, _)| seq.tokens().to_vec())
            .collect();
        let logits = {
            let mut batch: Vec<(&mut crate::models::llama::Cache, &[u32])> = active
                .iter_mut()
                .zip(&chosen)
                .filter(|(_, c)| **c)
                .map(|(seq, _)| seq.session.cache_mut())
                .zip(tokens.iter().map(Vec::as_slice))
                .collect();
            model.network().forward_batch(&mut batch, &mut work)
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                let problem = e.to_string();
                for seq in active.drain(..) {
                    end(seq.sink, Err(GenerateError::Batch(problem.clone())), load);
                }
                continue;
            }
        };
        let vocab = logits.len() / tokens.len().max(1);
        let mut still = Vec::with_capacity(active.len());
        let mut r = 0;
        for (mut seq, chosen) in active.drain(..).zip(chosen) {
            if !chosen {
                still.push(seq);
                continue;
            }
            let fed = &tokens[r];
            let row = &logits[r * vocab..(r + 1) * vocab];
            r += 1;
            seq.session.push_cached(fed);
            match &mut seq.phase {
                Phase::Decode { .. } => seq.decoder.passes += 1,
                Phase::Prompt {
                    prompt,
                    fed: done,
                    started,
                } => {
                    *done += fed.len();
                    if *done < prompt.len() {
                        still.push(seq);
                        continue;
                    }
                    let time = started.elapsed();
                    seq.decoder.prompt_done(time);
                }
            }
            if let Some(seq) = advance(model, seq, &mut row.to_vec(), load) {
                still.push(seq);
            }
        }
        active = still;
    }
}

/// Starts a new request: checks it and queues its prompt; None when it is refused.
fn admit(model: &ChatModel, mut job: Job, load: &Load) -> Option<Active> {
    let mut session = model.session();
    match model.begin(&mut session, &job.prompt, &job.options) {
        Ok((decoder, common)) => Some(Active {
            session,
            decoder,
            phase: Phase::Prompt {
                fed: common,
                prompt: job.prompt,
                started: Instant::now(),
            },
            sink: job.sink,
        }),
        Err(e) => {
            let _ = (job.sink)(Event::Done(Err(e)));
            finished(load);
            None
        }
    }
}

/// One decoder step on `logits`; returns the sequence while it goes on, else reports its end.
fn advance(model: &ChatModel, mut seq: Active, logits: &mut [f32], load: &Load) -> Option<Active> {
    let sink = &mut seq.sink;
    let mut on_text = |text: &str| sink(Event::Text(text));
    let cached = seq.session.cached_tokens();
    match seq.decoder.step(model, logits, cached, &mut on_text) {
        Ok(Step::Next(token)) => {
            seq.phase = Phase::Decode { next: token };
            Some(seq)
        }
        Ok(Step::Finished(stop)) => {
            let result = seq.decoder.finish(model, stop, &mut on_text);
            end(seq.sink, result, load);
            None
        }
        Err(e) => {
            end(seq.sink, Err(e), load);
            None
        }
    }
}

fn end(mut sink: Sink, result: Result<Generation, GenerateError>, load: &Load) {
    let _ = sink(Event::Done(result));
    finished(load);
}

fn finished(load: &Load) {
    load.active.fetch_sub(1, Ordering::SeqCst);
    load.accepted.fetch_sub(1, Ordering::SeqCst);
}
