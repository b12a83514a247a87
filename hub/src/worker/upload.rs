//! Swap-outs to S3 that never make a request wait for their upload (issue #14).
//!
//! A swap-out is over for the app once its snapshot is settled in the worker's local
//! store: its VMM has ended, its memory is free and its sockets are held. The upload to
//! S3 then runs on its own, one at a time per app, since an increment builds on what the
//! upload before it put there.
//!
//! The hub hears of the swap-out only when the upload has ended. Until then it takes the
//! app for resident here, so it keeps the previous snapshot as the app's restore point: a
//! worker that dies mid-upload leaves that snapshot whole in S3 (objects go first, HEAD
//! last), and the app comes back from it elsewhere. Traffic that arrives meanwhile brings
//! the app back here from the local copy, without asking the hub; when the upload then
//! ends, the report moves the hub's restore point on and leaves the app resident
//! ([`WorkerReport::stored`](crate::model::WorkerReport::stored)).

use super::{Worker, WorkerError};
use crate::cold::Stored;
use crate::model::{AppSpec, StartOrder, SwappedOut};
use std::sync::Arc;
use std::time::Duration;

/// Attempts at an upload before the worker gives up on it for this swap-out.
const UPLOAD_ATTEMPTS: u32 = 4;
/// The pause after the first failed attempt; it doubles after each.
const FIRST_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// The worker brings an app back for its timer during the upload only if the timer is
/// due within this (an upload takes less; a later timer is the hub's, as usual).
const LOCAL_WAKE_HORIZON: Duration = Duration::from_secs(600);

/// An app swapped out here whose snapshot is on its way to S3: what it takes to bring it
/// back from the local copy.
#[derive(Debug)]
struct Upload {
    spec: AppSpec,
    /// The settled snapshot being uploaded: the app's newest state.
    snapshot: String,
    /// Whether the worker holds its sockets: only then does it come back here from the
    /// local copy (at its own address) before the upload ends.
    held: bool,
    /// A start from the local copy is under way: the upload's end is reported when it
    /// has ended (as stored if it brought the app back, as a swap-out if not), so the hub
    /// never takes the app for out while it comes back here.
    coming_back: bool,
    /// The upload ended while the app was coming back: what to report then.
    ended: Option<SwappedOut>,
}

/// Where an app stands when its upload ends.
#[derive(Debug)]
enum AtUploadEnd {
    /// Still out: the hub hears of the swap-out now.
    Out,
    /// Coming back from the local copy: the hub hears when that ends.
    ComingBack,
    /// Back (or removed) before the upload ended: the hub hears of a stored snapshot.
    Back,
}

/// Per-app upload turns, and how many uploads are under way.
#[derive(Debug)]
pub(super) struct Uploads {
    /// Apps swapped out here whose upload has not ended (the hub does not know they are
    /// out).
    out: std::sync::Mutex<std::collections::HashMap<String, Upload>>,
    /// One lock per app with an upload running or waiting: uploads of one app run in
    /// order, and nothing removes the local files an upload reads.
    turns: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Uploads started and not ended.
    running: tokio::sync::watch::Sender<usize>,
}

impl Default for Uploads {
    fn default() -> Self {
        Self {
            out: Default::default(),
            turns: Default::default(),
            running: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Uploads {
    fn out(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Upload>> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// App `name`'s upload turn.
    pub(super) fn turn(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Whether an upload of app `name` is running or waiting for its turn.
    pub(super) fn in_flight(&self, name: &str) -> bool {
        self.turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|turn| Arc::strong_count(turn) > 1)
    }

    /// Forgets app `name`'s turn if no upload holds or waits for it.
    pub(super) fn drop_turn(&self, name: &str) {
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        if turns.get(name).is_some_and(|t| Arc::strong_count(t) == 1) {
            turns.remove(name);
        }
    }

    /// The order that brings app `name` back from its local copy, if it is out and its
    /// upload has not ended.
    pub(super) fn comeback(&self, name: &str) -> Option<StartOrder> {
        self.out()
            .get(name)
            .filter(|u| u.held)
            .map(|upload| StartOrder {
                spec: upload.spec.clone(),
                snapshot: Some(upload.snapshot.clone()),
                chain_hint: Default::default(),
            })
    }

    /// A start of app `name` from its local snapshot `id` begins; false if the app is
    /// not out with that snapshot, or already coming back.
    pub(super) fn begin_comeback(&self, name: &str, id: &str) -> bool {
        match self.out().get_mut(name) {
            Some(upload) if upload.snapshot == id && !upload.coming_back => {
                upload.coming_back = true;
                true
            }
            _ => false,
        }
    }

    /// The start that [`Uploads::begin_comeback`] began has ended (`back`: the app runs).
    /// Returns what the hub must hear now, if the upload ended meanwhile: the snapshot,
    /// as stored (the app is back) or as a swap-out (it is not).
    pub(super) fn end_comeback(&self, name: &str, id: &str, back: bool) -> Option<SwappedOut> {
        let mut out = self.out();
        let upload = out.get_mut(name).filter(|u| u.snapshot == id)?;
        upload.coming_back = false;
        if back || upload.ended.is_some() {
            return out.remove(name).and_then(|u| u.ended);
        }
        None
    }

    /// The upload of app `name`'s snapshot `id` has ended: where the app stands. A
    /// snapshot whose app is coming back keeps `swapped` for [`Uploads::end_comeback`].
    fn upload_done(&self, name: &str, id: &str, swapped: &SwappedOut) -> AtUploadEnd {
        let mut out = self.out();
        match out.get_mut(name).filter(|u| u.snapshot == id) {
            None => AtUploadEnd::Back,
            Some(upload) if upload.coming_back => {
                upload.ended = Some(swapped.clone());
                AtUploadEnd::ComingBack
            }
            Some(_) => {
                out.remove(name);
                AtUploadEnd::Out
            }
        }
    }

    /// Forgets app `name`'s upload of `id` if its sockets are not held (nothing brings it
    /// back here); says whether it did.
    fn take_unheld(&self, name: &str, id: &str) -> bool {
        let mut out = self.out();
        let unheld = out.get(name).is_some_and(|u| u.snapshot == id && !u.held);
        if unheld {
            out.remove(name);
        }
        unheld
    }

    /// App `name` was removed: its upload, if one runs, brings nothing back.
    pub(super) fn forget(&self, name: &str) {
        self.out().remove(name);
    }

    /// Whether app `name` is out with an upload that has not ended.
    pub(super) fn is_out(&self, name: &str) -> bool {
        self.out().contains_key(name)
    }

    /// Waits until no upload is under way.
    pub(super) async fn drained(&self) {
        let mut running = self.running.subscribe();
        let _ = running.wait_for(|n| *n == 0).await;
    }
}

impl Worker {
    /// Uploads app `name`'s settled snapshot `stored` in the background, once the uploads
    /// of the app before it have ended; if the worker `held` its sockets, `spec` brings
    /// the app back from the local copy when traffic arrives meanwhile. The task's result
    /// is the swap-out as the hub hears of it.
    pub(super) fn upload_in_background(
        self: &Arc<Self>,
        name: &str,
        spec: AppSpec,
        stored: Stored,
        held: bool,
    ) -> tokio::task::JoinHandle<Result<SwappedOut, WorkerError>> {
        self.uploads.out().insert(
            name.to_string(),
            Upload {
                spec,
                snapshot: stored.id.clone(),
                held,
                coming_back: false,
                ended: None,
            },
        );
        self.uploads.running.send_modify(|n| *n += 1);
        if let Some(at) = stored.wake_at_unix_ms.filter(|_| held) {
            self.wake_at(name, &stored.id, at);
        }
        let turn = self.uploads.turn(name);
        let this = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            // Counted down however the task ends (a panic included), or shutdown would
            // wait for it for ever.
            let _running = Running(this.clone());
            let result = {
                let _turn = turn.lock().await;
                this.upload_with_retries(&name, &stored.id).await
            };
            drop(turn);
            let ended = this.upload_ended(&name, stored, result).await;
            this.uploads.drop_turn(&name);
            ended
        })
    }

    /// At `at` (Unix ms, the app's earliest deadline), brings app `name` back from its
    /// local snapshot `id` if its upload has not ended by then: the hub, which would wake
    /// it otherwise, learns the deadline only with the swap-out.
    fn wake_at(self: &Arc<Self>, name: &str, id: &str, at: u64) {
        let this = self.clone();
        let (name, id) = (name.to_string(), id.to_string());
        let due_in = Duration::from_millis(at.saturating_sub(crate::model::unix_ms()));
        if due_in > LOCAL_WAKE_HORIZON {
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(due_in).await;
            let Some(order) = this.uploads.comeback(&name) else {
                return;
            };
            if order.snapshot.as_deref() != Some(id.as_str()) {
                return;
            }
            tracing::info!(app = %name, "its timer is due during its upload: bringing it back from the local copy");
            if let Err(e) = this.start_boxed(order).await {
                tracing::warn!(app = %name, "bringing it back for its timer: {e}");
            }
        });
    }

    /// [`Cold::upload`](crate::cold::Cold::upload), tried [`UPLOAD_ATTEMPTS`] times.
    /// Returns the bytes the app's chain takes in S3, if it is S3.
    async fn upload_with_retries(
        &self,
        name: &str,
        id: &str,
    ) -> Result<Option<crate::cold::Uploaded>, WorkerError> {
        let began = std::time::Instant::now();
        let mut pause = FIRST_RETRY_PAUSE;
        let mut attempt = 1;
        loop {
            let cold = self.cold.clone();
            let (app, snapshot) = (name.to_string(), id.to_string());
            let result = tokio::task::spawn_blocking(move || cold.upload(&app, &snapshot))
                .await
                .map_err(|e| WorkerError::Internal(e.to_string()))
                .and_then(|uploaded| uploaded.map_err(WorkerError::from));
            match result {
                Ok(stored) => {
                    self.metrics
                        .upload_seconds
                        .observe(began.elapsed().as_secs_f64());
                    tracing::info!(app = %name, snapshot = %id, ms = began.elapsed().as_secs_f64() * 1e3, ?stored, "uploaded to cold storage");
                    return Ok(stored);
                }
                Err(e) if attempt < UPLOAD_ATTEMPTS => {
                    tracing::warn!(app = %name, snapshot = %id, attempt, "uploading failed ({e}); trying again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                Err(e) => {
                    self.metrics.upload_failures.inc();
                    return Err(e);
                }
            }
        }
    }

    /// After the upload of app `name`'s snapshot `stored`: tells the hub. If it failed
    /// and the app is still out, the app comes back from its local copy rather than fall
    /// back to an older snapshot (its next swap-out tries again).
    async fn upload_ended(
        self: &Arc<Self>,
        name: &str,
        stored: Stored,
        result: Result<Option<crate::cold::Uploaded>, WorkerError>,
    ) -> Result<SwappedOut, WorkerError> {
        let uploaded = result.as_ref().ok().cloned().flatten();
        let mut chain_hint = stored.chain_hint.clone();
        if let Some(uploaded) = &uploaded {
            chain_hint.packed = uploaded.packed.clone();
        }
        let swapped = SwappedOut {
            name: name.to_string(),
            snapshot: stored.id.clone(),
            chain_hint,
            stored_bytes: uploaded.map_or(stored.bytes, |u| u.stored_bytes),
            logical_bytes: stored.bytes,
            wake_at_unix_ms: stored.wake_at_unix_ms,
            seq: self.next_seq(),
        };
        if let Err(e) = result {
            match self.uploads.comeback(name) {
                Some(order) if order.snapshot.as_deref() == Some(stored.id.as_str()) => {
                    tracing::error!(app = %name, snapshot = %stored.id, "uploading failed ({e}): bringing the app back from the local copy");
                    // The entry stays while it comes back (nothing evicts the only copy);
                    // if that fails too, it stays out, held, and the next connection
                    // tries again.
                    if let Err(back) = self.start_boxed(order).await {
                        tracing::error!(app = %name, "it cannot come back from the local copy either: {back}");
                    }
                }
                _ if self.uploads.take_unheld(name, &stored.id) => {
                    // Nothing holds its address: it comes back from the hub's restore
                    // point, wherever the hub likes.
                    tracing::error!(app = %name, snapshot = %stored.id, "uploading failed ({e}): the app goes back to its last snapshot in cold storage");
                    self.pending_report()
                        .ended
                        .push((name.to_string(), format!("swap-out failed: {e}")));
                    self.report_soon.notify_one();
                }
                _ => {
                    tracing::warn!(app = %name, snapshot = %stored.id, "uploading failed ({e}): the snapshot is only on this worker, and the app's next swap-out uploads it with its own");
                }
            }
            return Err(e);
        }
        if !stored.replaced.is_empty() {
            self.prunes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(stored.id.clone(), (name.to_string(), stored.replaced));
        }
        match self.uploads.upload_done(name, &stored.id, &swapped) {
            AtUploadEnd::Out => {
                tracing::info!(app = %name, snapshot = %swapped.snapshot, stored_bytes = swapped.stored_bytes, wake_at_unix_ms = ?swapped.wake_at_unix_ms, "swapped out");
                self.pending_report().swapped.push(swapped.clone());
                self.report_soon.notify_one();
                self.trim_cache().await;
            }
            AtUploadEnd::ComingBack => {
                tracing::info!(app = %name, snapshot = %swapped.snapshot, "in cold storage; the app is coming back meanwhile");
            }
            AtUploadEnd::Back => {
                tracing::info!(app = %name, snapshot = %swapped.snapshot, "in cold storage; the app came back meanwhile");
                self.pending_report().stored.push(swapped.clone());
                self.report_soon.notify_one();
            }
        }
        Ok(swapped)
    }

    /// Tells the hub what [`Uploads::end_comeback`] returned: the snapshot as stored if
    /// the app is `back`, as a swap-out if not.
    pub(super) fn report_comeback(&self, back: bool, snapshot: Option<SwappedOut>) {
        let Some(snapshot) = snapshot else { return };
        let mut pending = self.pending_report();
        if back {
            pending.stored.push(snapshot);
        } else {
            tracing::info!(app = %snapshot.name, snapshot = %snapshot.snapshot, "swapped out (it could not come back from the local copy)");
            pending.swapped.push(snapshot);
        }
        drop(pending);
        self.report_soon.notify_one();
    }
}

/// Counts an upload task as ended when dropped.
struct Running(Arc<Worker>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0
            .uploads
            .running
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}
