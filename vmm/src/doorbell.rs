//! Bringing an app the VMM stopped inside the doorbell to a clean point.
//!
//! A kick (a signal raised for the app, a snapshot request, a timer) stops the vCPU
//! wherever it is, and that can be inside the doorbell page: answering a time call, posting
//! a call to the mailbox or spinning for its answer, or returning to the app. There the
//! app's registers are partly the doorbell's, so no signal frame may be built and no
//! snapshot taken. Before the VMM looks at the app's context it calls [`Doorbell::settle`],
//! which puts the app where Linux would have it: about to execute its own `syscall`
//! instruction again (a *rewind*, as Linux restarts a call), or just after it returned
//! (a *completion*). [`picocenter_guest_shim::doorbell_region`] says which, by RIP; this
//! module applies it, settling an in-flight mailbox call first.

use crate::kvm::vcpu::{Vcpu, VcpuError};
use crate::mailbox::Poller;
use crate::memory::layout::cpu_local_gpa;
use crate::memory::phys::{PhysError, PhysicalMemory, SharedPage};
use picocenter_guest_shim::abi::{self, mailbox, scratch};
use picocenter_guest_shim::{doorbell_region, DoorbellRegion};
use std::sync::atomic::Ordering;

/// The registers the doorbell borrows (RAX, RCX, RDX) and RSP, as the vCPU holds them or
/// as the doorbell saved them in its scratch page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Borrowed {
    /// RAX: the syscall number on entry, the result on return.
    pub rax: u64,
    /// RCX: the app's return address (after its `syscall` instruction).
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSP.
    pub rsp: u64,
}

/// What became of a call that was in the mailbox when the vCPU stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailboxCall {
    /// It was not performed (withdrawn, or declined by the poller): make it again.
    NotPerformed,
    /// The poller performed it with this result.
    Performed(u64),
}

/// How the app is brought to a clean point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// About to execute its `syscall` again: RIP = RCX - 2, RFLAGS = R11, with these
    /// registers (RAX is the number).
    Rewind(Borrowed),
    /// Its `syscall` returned: RIP = RCX, RFLAGS = R11, with these registers (RAX is the
    /// result).
    Complete(Borrowed),
}

/// The recovery for a vCPU stopped in `region` with the `live` registers, the ones the
/// doorbell `saved`, and (for [`DoorbellRegion::Posted`] only) what became of the mailbox
/// call. This is the whole table of the doorbell's clean points.
pub fn recovery(
    region: DoorbellRegion,
    live: Borrowed,
    saved: Borrowed,
    call: MailboxCall,
) -> Recovery {
    // RSP is the app's everywhere except on the scratch stack.
    let restored = Borrowed {
        rsp: live.rsp,
        ..saved
    };
    match region {
        DoorbellRegion::Entry => Recovery::Rewind(live),
        DoorbellRegion::Saved => Recovery::Rewind(restored),
        DoorbellRegion::Posted => match call {
            MailboxCall::NotPerformed => Recovery::Rewind(restored),
            MailboxCall::Performed(result) => Recovery::Complete(Borrowed {
                rax: result,
                ..restored
            }),
        },
        DoorbellRegion::Answered => Recovery::Complete(live),
        DoorbellRegion::ScratchStack => Recovery::Complete(Borrowed {
            rsp: saved.rsp,
            ..live
        }),
    }
}

/// What [`Doorbell::settle`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The vCPU was not in the doorbell: nothing to do.
    Outside,
    /// It was, at an instruction that faulted (a time call's store to the app's buffer),
    /// and KVM has yet to deliver that fault. It is delivered to its stub on the next
    /// entry, whatever RIP the vCPU has then, so the vCPU stays where it is: the stub's
    /// exit answers the call.
    Faulting,
    /// It was, and now is at a clean point.
    Recovered(Recovery),
    /// It was somewhere no `syscall` leads (the app jumped into the doorbell page): the app
    /// must die, with this report.
    Stray(String),
}

/// Starts over the vDSO function the vCPU is in, if it is in one (see
/// `picocenter_guest_shim::vdso_restart`) and no fault of it waits for delivery. For a
/// vCPU a kick stopped, and before the VMM looks at the app's context. A vDSO function
/// that made a call the VMM completed makes it again: the vDSO's calls (the clocks) have
/// no side effects.
pub fn restart_in_vdso(vcpu: &mut Vcpu) -> Result<(), VcpuError> {
    let offset = vcpu.regs().rip.wrapping_sub(abi::VDSO_VA + abi::vdso::CODE);
    if offset >= abi::PAGE_SIZE - abi::vdso::CODE {
        return Ok(());
    }
    if let Some(entry) = picocenter_guest_shim::vdso_restart(offset).filter(|&e| e != offset) {
        if !vcpu.exception_in_flight()? {
            vcpu.regs_mut().rip = abi::VDSO_VA + abi::vdso::CODE + entry;
        }
    }
    Ok(())
}

/// Why the app could not be brought to a clean point (a host failure).
#[derive(Debug, thiserror::Error)]
pub enum CleanPointError {
    /// The mailbox poller stopped while it held the app's call.
    #[error("the mailbox poller stopped while performing a call")]
    PollerStopped,
    /// The vCPU's registers could not be set.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// What the mailbox poller is doing, as a vCPU settling a call marked taken sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollerView {
    /// It performs this vCPU's call now.
    Serving,
    /// It runs, but not for this vCPU's call: the app marked the call taken itself.
    Elsewhere,
    /// It stopped (or panicked).
    Stopped,
}

/// The doorbell's scratch page and the mailbox, as the VMM sees them.
#[derive(Debug)]
pub struct Doorbell {
    /// The vCPU they are of.
    cpu: usize,
    scratch: SharedPage,
    mailbox: SharedPage,
}

impl Doorbell {
    /// Views vCPU `cpu`'s scratch and mailbox pages in the guest memory `phys`.
    pub fn new(phys: &PhysicalMemory, cpu: u64) -> Result<Self, PhysError> {
        let page = |index: u64| phys.shared_page(cpu_local_gpa(cpu, index));
        Ok(Self {
            cpu: cpu as usize,
            scratch: page(abi::cpu_local::SCRATCH_PAGE)?,
            mailbox: page(abi::cpu_local::MAILBOX_PAGE)?,
        })
    }

    /// The vCPU's mailbox page (for the poller, which serves it).
    pub fn mailbox(&self) -> &SharedPage {
        &self.mailbox
    }

    /// The registers the doorbell saved.
    fn saved(&self) -> Borrowed {
        let slot = |offset| self.scratch.u64(offset).load(Ordering::Acquire);
        Borrowed {
            rax: slot(scratch::RAX),
            rcx: slot(scratch::RCX),
            rdx: slot(scratch::RDX),
            rsp: slot(scratch::RSP),
        }
    }

    /// Brings the vCPU to a clean point if it stopped inside the doorbell. Must be called
    /// without the process lock held: a call the poller has taken is waited for, and the
    /// poller needs that lock to finish it.
    pub fn settle(
        &self,
        vcpu: &mut Vcpu,
        poller: Option<&Poller>,
    ) -> Result<Settled, CleanPointError> {
        let regs = vcpu.regs();
        let offset = regs.rip.wrapping_sub(abi::DOORBELL_VA);
        if offset >= abi::PAGE_SIZE {
            return Ok(Settled::Outside);
        }
        if vcpu.exception_in_flight()? {
            return Ok(Settled::Faulting);
        }
        let Some(region) = doorbell_region(offset) else {
            return Ok(Settled::Stray(format!(
                "stopped in the doorbell page past its code, at rip={:#x}",
                regs.rip
            )));
        };
        let call = if region == DoorbellRegion::Posted {
            // After a panic anywhere the run ends; the poller may be the thread that died.
            let cpu = self.cpu;
            let view = poller.map(|p| {
                move || {
                    if crate::panics::report().is_some() {
                        PollerView::Stopped
                    } else if p.serving(cpu) {
                        // Its thread ends mid-call only by a panic.
                        if p.running() {
                            PollerView::Serving
                        } else {
                            PollerView::Stopped
                        }
                    } else {
                        // Running, retired or stopped, it performs no call of this vCPU.
                        PollerView::Elsewhere
                    }
                }
            });
            match self.settle_call(view.as_ref().map(|f| f as &dyn Fn() -> PollerView))? {
                Some(call) => call,
                None => {
                    return Ok(Settled::Stray(
                        "a mailbox call marked taken with no poller to perform it".into(),
                    ))
                }
            }
        } else {
            MailboxCall::NotPerformed
        };
        let live = Borrowed {
            rax: regs.rax,
            rcx: regs.rcx,
            rdx: regs.rdx,
            rsp: regs.rsp,
        };
        let recovery = recovery(region, live, self.saved(), call);
        let (Recovery::Rewind(to) | Recovery::Complete(to)) = recovery;
        let rewind = matches!(recovery, Recovery::Rewind(_));
        // The app can jump into the doorbell page with registers of its own choosing;
        // never resume it outside user space.
        let rip = if rewind {
            to.rcx.wrapping_sub(2)
        } else {
            to.rcx
        };
        if !crate::memory::space::app_code_address(rip) {
            return Ok(Settled::Stray(format!(
                "left the doorbell for a non-user address {rip:#x}"
            )));
        }
        {
            let regs = vcpu.regs_mut();
            (regs.rax, regs.rcx, regs.rdx, regs.rsp) = (to.rax, to.rcx, to.rdx, to.rsp);
        }
        // RIP = RCX, RFLAGS = R11, and the user segments where the doorbell ran at CPL 0.
        vcpu.complete_syscall()?;
        vcpu.regs_mut().rip = rip;
        Ok(Settled::Recovered(recovery))
    }

    /// Settles the mailbox call of a vCPU stopped in the Posted region: withdraws it if
    /// the poller has not taken it, waits for it if it has, and takes its answer. The
    /// mailbox is EMPTY afterwards. `poller` says what the poller does (`None`: there is
    /// none). Returns `None` for a call marked taken that no poller performs (the app
    /// wrote the mark).
    fn settle_call(
        &self,
        poller: Option<&dyn Fn() -> PollerView>,
    ) -> Result<Option<MailboxCall>, CleanPointError> {
        let state = self.mailbox.u32(mailbox::STATE);
        let mut spins = 0u32;
        loop {
            match state.load(Ordering::Acquire) {
                mailbox::REQUEST => {
                    // The poller may take it at the same moment: one of the two wins.
                    if state
                        .compare_exchange(
                            mailbox::REQUEST,
                            mailbox::EMPTY,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                    {
                        return Ok(Some(MailboxCall::NotPerformed));
                    }
                }
                mailbox::TAKEN => match poller.map(|view| view()) {
                    None => return Ok(None),
                    Some(PollerView::Stopped) => return Err(CleanPointError::PollerStopped),
                    // The poller marks the vCPU it serves before it takes the call, and
                    // unmarks it after the answer: taken and still unserved, the mark is
                    // the app's.
                    Some(PollerView::Elsewhere)
                        if state.load(Ordering::Acquire) == mailbox::TAKEN =>
                    {
                        return Ok(None)
                    }
                    Some(_) => {
                        spins = spins.wrapping_add(1);
                        if spins.is_multiple_of(64) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                },
                mailbox::DONE => {
                    let declined = self.mailbox.u32(mailbox::DECLINED).load(Ordering::Acquire);
                    let result = self.mailbox.u64(mailbox::RESULT).load(Ordering::Acquire);
                    state.store(mailbox::EMPTY, Ordering::Release);
                    return Ok(Some(if declined != 0 {
                        MailboxCall::NotPerformed
                    } else {
                        MailboxCall::Performed(result)
                    }));
                }
                // EMPTY: the doorbell withdrew it itself, or saw it declined. Anything
                // else was written by the app, not the doorbell.
                _ => {
                    state.store(mailbox::EMPTY, Ordering::Release);
                    return Ok(Some(MailboxCall::NotPerformed));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DoorbellRegion::*;

    const LIVE: Borrowed = Borrowed {
        rax: 1,
        rcx: 2,
        rdx: 3,
        rsp: 4,
    };
    const SAVED: Borrowed = Borrowed {
        rax: 39,
        rcx: 0x401002,
        rdx: 7,
        rsp: 0x7ff0,
    };

    #[test]
    fn before_the_registers_are_saved_the_live_ones_are_rewound() {
        assert_eq!(
            recovery(Entry, LIVE, SAVED, MailboxCall::NotPerformed),
            Recovery::Rewind(LIVE)
        );
    }

    #[test]
    fn until_a_result_is_committed_the_saved_registers_are_rewound() {
        let expected = Recovery::Rewind(Borrowed { rsp: 4, ..SAVED });
        assert_eq!(
            recovery(Saved, LIVE, SAVED, MailboxCall::NotPerformed),
            expected
        );
        assert_eq!(
            recovery(Posted, LIVE, SAVED, MailboxCall::NotPerformed),
            expected
        );
    }

    #[test]
    fn a_performed_mailbox_call_completes_with_its_result() {
        assert_eq!(
            recovery(Posted, LIVE, SAVED, MailboxCall::Performed(99)),
            Recovery::Complete(Borrowed {
                rax: 99,
                rsp: 4,
                ..SAVED
            })
        );
    }

    #[test]
    fn an_answered_call_completes_with_the_apps_stack() {
        assert_eq!(
            recovery(Answered, LIVE, SAVED, MailboxCall::NotPerformed),
            Recovery::Complete(LIVE)
        );
        assert_eq!(
            recovery(ScratchStack, LIVE, SAVED, MailboxCall::NotPerformed),
            Recovery::Complete(Borrowed {
                rsp: 0x7ff0,
                ..LIVE
            })
        );
    }

    fn doorbell() -> (PhysicalMemory, Doorbell) {
        let phys = PhysicalMemory::new(2 << 20).unwrap();
        let doorbell = Doorbell::new(&phys, crate::memory::layout::FIRST_CPU).unwrap();
        (phys, doorbell)
    }

    fn set(doorbell: &Doorbell, state: u32, declined: u32, result: u64) {
        doorbell
            .mailbox
            .u64(mailbox::RESULT)
            .store(result, Ordering::SeqCst);
        doorbell
            .mailbox
            .u32(mailbox::DECLINED)
            .store(declined, Ordering::SeqCst);
        doorbell
            .mailbox
            .u32(mailbox::STATE)
            .store(state, Ordering::SeqCst);
    }

    fn state(doorbell: &Doorbell) -> u32 {
        doorbell.mailbox.u32(mailbox::STATE).load(Ordering::SeqCst)
    }

    #[test]
    fn a_posted_call_is_withdrawn_or_its_answer_taken() {
        let (_phys, doorbell) = doorbell();
        for (posted, declined, expected) in [
            (mailbox::REQUEST, 0, MailboxCall::NotPerformed),
            (mailbox::EMPTY, 0, MailboxCall::NotPerformed),
            (mailbox::DONE, 1, MailboxCall::NotPerformed),
            (mailbox::DONE, 0, MailboxCall::Performed(42)),
        ] {
            set(&doorbell, posted, declined, 42);
            assert_eq!(doorbell.settle_call(None).unwrap(), Some(expected));
            assert_eq!(state(&doorbell), mailbox::EMPTY);
        }
        set(&doorbell, mailbox::TAKEN, 0, 0);
        assert_eq!(doorbell.settle_call(None).unwrap(), None);
        assert!(matches!(
            doorbell.settle_call(Some(&|| PollerView::Stopped)),
            Err(CleanPointError::PollerStopped)
        ));
        // Marked taken by the app: the poller runs but serves no call of this vCPU.
        assert_eq!(
            doorbell
                .settle_call(Some(&|| PollerView::Elsewhere))
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_taken_call_is_waited_for() {
        let (_phys, doorbell) = doorbell();
        set(&doorbell, mailbox::TAKEN, 0, 0);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                set(&doorbell, mailbox::DONE, 0, 7);
            });
            assert_eq!(
                doorbell.settle_call(Some(&|| PollerView::Serving)).unwrap(),
                Some(MailboxCall::Performed(7))
            );
        });
        assert_eq!(state(&doorbell), mailbox::EMPTY);
    }
}
