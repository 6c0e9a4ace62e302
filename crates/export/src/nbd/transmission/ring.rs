//! Plain reads and in-place writes through io_uring: the reader hands
//! them to the ring, and a worker replies to what the ring has finished.

use super::*;

/// A READ or WRITE the ring has done, waiting for its reply.
pub(super) struct Completed {
    pub(super) req: Request,
    pub(super) buf: AlignedBuf,
    /// Allocation of a structured read, for its hole chunks.
    pub(super) runs: Vec<(u64, bool)>,
    pub(super) failed: Option<i32>,
    pub(super) _budget: BudgetGuard,
}

/// Requests the ring can take: whole O_DIRECT blocks.
pub(super) const QUEUE_ALIGN: u64 = 4096;

impl Connection {
    /// Hand a plain READ or in-place WRITE to the ring. Gives the payload
    /// and budget back when the request needs the image layer instead.
    pub(super) fn try_queue(
        self: &Arc<Self>,
        req: Request,
        payload: Option<(AlignedBuf, usize)>,
        budget: BudgetGuard,
    ) -> Result<Op, (Option<(AlignedBuf, usize)>, BudgetGuard)> {
        if self.shared.ring.is_none() {
            return Err((payload, budget));
        }
        let read = req.kind == CMD_READ;
        let plain = (read || (req.kind == CMD_WRITE && !self.export.read_only))
            && req.length > 0
            && req.length <= u64::from(MAX_PAYLOAD)
            && req.offset.is_multiple_of(QUEUE_ALIGN)
            && req.length.is_multiple_of(QUEUE_ALIGN)
            && self.check_range(&req, EINVAL).is_ok();
        if !plain {
            return Err((payload, budget));
        }
        let disk = &self.export.disk;
        // The reader may hold requests for the ring: never wait here for an
        // online operation that waits for those (the pool can wait).
        let Some(chain) = disk.try_chain() else {
            return Err((payload, budget));
        };
        let plan = if read {
            chain.plan_read(req.offset, req.length)
        } else {
            chain.plan_write(req.offset, req.length)
        };
        let Ok(Some(plan)) = plan else {
            return Err((payload, budget));
        };
        let runs = if read && self.structured() && req.flags & CMD_FLAG_DF == 0 {
            match chain.allocation(req.offset, req.length, MAX_STATUS_RUNS) {
                Ok(r) => r,
                Err(_) => return Err((payload, budget)),
            }
        } else {
            Vec::new()
        };
        let len = req.length as usize;
        let buf = if read {
            let mut buf = self.shared.buffer(len);
            // Pieces no delta holds read as zeros.
            let b = buf.as_mut_slice();
            let mut at = 0;
            for s in &plan.segments {
                b[at..s.buf_offset].fill(0);
                at = s.buf_offset + s.len;
            }
            b[at..len].fill(0);
            buf
        } else {
            payload.expect("WRITE carries its payload").0
        };
        // Registered while the guard is held: see ServedDisk::begin_queued.
        let (segments, in_flight) = disk.begin_queued(plan);
        let planned_on = Arc::clone(&chain);
        drop(chain);
        let conn = self.clone();
        Ok(Op {
            offset: req.offset,
            segments,
            buf,
            chain: planned_on,
            in_flight,
            answer: Answer::Call {
                read,
                done: Box::new(move |buf, failed| {
                    conn.completed_by_ring(Completed {
                        req,
                        buf,
                        runs,
                        failed,
                        _budget: budget,
                    })
                }),
            },
        })
    }

    /// On the ring thread: keep the result, and have a worker reply
    /// (a send may block; the ring must not).
    pub(super) fn completed_by_ring(self: &Arc<Self>, c: Completed) {
        lock(&self.completed).push(c);
        if !self.reply_scheduled.swap(true, Ordering::SeqCst) {
            let conn = self.clone();
            self.shared
                .exec
                .run(Box::new(move || conn.reply_completed()));
        }
    }

    /// Reply to everything the ring has finished, in one send.
    pub(super) fn reply_completed(&self) {
        let done = catch_unwind(AssertUnwindSafe(|| self.reply_completed_batches()));
        if let Err(panic) = done {
            error!("replying to queued requests panicked: {panic:?}; cutting the connection");
            self.broken.store(true, Ordering::SeqCst);
            if let Some(mut out) = try_lock(&self.out) {
                out.sink.abort();
            }
            // Their budgets go back; nothing more is sent.
            lock(&self.completed).clear();
            self.reply_scheduled.store(false, Ordering::SeqCst);
        }
    }

    pub(super) fn reply_completed_batches(&self) {
        loop {
            self.reply_scheduled.store(false, Ordering::SeqCst);
            let batch = std::mem::take(&mut *lock(&self.completed));
            if batch.is_empty() {
                return;
            }
            let fua = |c: &Completed| {
                c.req.kind == CMD_WRITE && c.failed.is_none() && c.req.flags & CMD_FLAG_FUA != 0
            };
            let flushed = if batch.iter().any(fua) {
                self.export
                    .disk
                    .chain()
                    .flush()
                    .map_err(|e| image_failure(&e).1)
            } else {
                Ok(())
            };
            let mut replies = Vec::with_capacity(batch.len());
            // Budgets go back once the replies hold theirs: until then the
            // connection must not look finished.
            let mut budgets = Vec::with_capacity(batch.len());
            for c in batch {
                let is_fua = fua(&c);
                let Completed {
                    req,
                    buf,
                    runs,
                    failed,
                    _budget,
                } = c;
                budgets.push(_budget);
                replies.push(match failed {
                    Some(e) => {
                        self.shared.recycle(buf);
                        Reply::bytes(self.error_reply(&req, errno_failure(e)))
                    }
                    None if req.kind == CMD_READ => self.read_reply(&req, buf, &runs),
                    None => {
                        let r = match &flushed {
                            Err(msg) if is_fua => self.error_reply(&req, failure(EIO, msg.clone())),
                            _ => self.done_reply(&req),
                        };
                        self.shared.recycle(buf);
                        Reply::bytes(r)
                    }
                });
            }
            self.send_all(replies);
            drop(budgets);
        }
    }
}
