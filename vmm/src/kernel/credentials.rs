//! A process's user and group ids, as Linux keeps them (credentials(7)): a real,
//! effective, saved and filesystem id of each kind, and the supplementary groups.
//!
//! Privilege is Linux's root without file capabilities: a process whose effective uid is
//! 0 holds CAP_SETUID and CAP_SETGID, one that dropped it to another uid while its real
//! or saved uid stays 0 may take it back, and one with no 0 left may not. A fork keeps
//! the ids, and an execve copies the effective ids to the saved ones (set-id bits of
//! programs are not honoured: the app's root is read-only and owned by no user of the
//! app).
//!
//! The ids are what the app sees and checks (postfix's daemons refuse to serve as root,
//! local delivery takes the recipient's ids). They do not narrow what the VMM does for
//! the app: its files and sockets are its sandbox's, whichever of its users asks.

use picocenter_snapshots::format::CredentialsRecord;
use rustix::io::Errno;

/// The `-1` of setreuid(2) and setresuid(2): this id stays as it is.
pub const UNCHANGED: u32 = u32::MAX;

pub use picocenter_snapshots::bounds::NGROUPS_MAX;

/// One kind of id: user or group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ids {
    /// Who the process is.
    pub real: u32,
    /// Whom it acts as.
    pub effective: u32,
    /// What it may go back to.
    pub saved: u32,
    /// Whom it acts as on files (follows `effective`).
    pub fs: u32,
}

impl Ids {
    /// Real, effective, saved and filesystem, in that order (as /proc and snapshots
    /// list them).
    pub fn as_array(&self) -> [u32; 4] {
        [self.real, self.effective, self.saved, self.fs]
    }

    fn all(id: u32) -> Self {
        Ids {
            real: id,
            effective: id,
            saved: id,
            fs: id,
        }
    }

    /// Whether an unprivileged process may take `id`: it is one of its real, effective
    /// or saved ids.
    fn holds(&self, id: u32) -> bool {
        id == self.real || id == self.effective || id == self.saved
    }

    /// setuid(2) and setgid(2).
    fn set(&mut self, id: u32, privileged: bool) -> Result<(), Errno> {
        if id == UNCHANGED {
            return Err(Errno::INVAL);
        }
        if privileged {
            *self = Ids::all(id);
        } else if id == self.real || id == self.saved {
            self.effective = id;
            self.fs = id;
        } else {
            return Err(Errno::PERM);
        }
        Ok(())
    }

    /// setreuid(2) and setregid(2).
    fn set_real_effective(
        &mut self,
        real: u32,
        effective: u32,
        privileged: bool,
    ) -> Result<(), Errno> {
        if !privileged {
            let real_ok = real == UNCHANGED || real == self.real || real == self.effective;
            let effective_ok = effective == UNCHANGED || self.holds(effective);
            if !(real_ok && effective_ok) {
                return Err(Errno::PERM);
            }
        }
        let new_effective = if effective == UNCHANGED {
            self.effective
        } else {
            effective
        };
        // Linux's rule: the saved id follows a real id set, or an effective id set to
        // anything but the old real one.
        if real != UNCHANGED || (effective != UNCHANGED && effective != self.real) {
            self.saved = new_effective;
        }
        if real != UNCHANGED {
            self.real = real;
        }
        self.effective = new_effective;
        self.fs = new_effective;
        Ok(())
    }

    /// setresuid(2) and setresgid(2).
    fn set_all(
        &mut self,
        real: u32,
        effective: u32,
        saved: u32,
        privileged: bool,
    ) -> Result<(), Errno> {
        let asked = [real, effective, saved];
        // Nothing to change (an effective id asked for is the filesystem one too): Linux
        // returns at once, and a filesystem id set apart stays.
        let same = |new: u32, old: u32| new == UNCHANGED || new == old;
        if same(real, self.real)
            && same(effective, self.effective)
            && same(effective, self.fs)
            && same(saved, self.saved)
        {
            return Ok(());
        }
        if !privileged && !asked.iter().all(|&id| id == UNCHANGED || self.holds(id)) {
            return Err(Errno::PERM);
        }
        let keep = |new: u32, old: u32| if new == UNCHANGED { old } else { new };
        self.real = keep(real, self.real);
        self.effective = keep(effective, self.effective);
        self.saved = keep(saved, self.saved);
        self.fs = self.effective;
        Ok(())
    }

    /// setfsuid(2) and setfsgid(2): the old filesystem id, whether or not the new one
    /// was taken (Linux reports no error).
    fn set_fs(&mut self, fs: u32, privileged: bool) -> u32 {
        let old = self.fs;
        if fs != UNCHANGED && (privileged || self.holds(fs) || fs == self.fs) {
            self.fs = fs;
        }
        old
    }
}

/// Which of a process's ids: user or group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// User ids.
    User,
    /// Group ids.
    Group,
}

/// A process's ids; a new app's are root's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    /// User ids.
    pub uid: Ids,
    /// Group ids.
    pub gid: Ids,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Whether the process holds CAP_SETUID and CAP_SETGID.
    pub fn privileged(&self) -> bool {
        self.uid.effective == 0
    }

    /// The ids of `kind`.
    pub fn ids(&self, kind: Kind) -> &Ids {
        match kind {
            Kind::User => &self.uid,
            Kind::Group => &self.gid,
        }
    }

    /// The ids of `kind`, and whether the process may take any of them.
    fn ids_mut(&mut self, kind: Kind) -> (&mut Ids, bool) {
        let privileged = self.privileged();
        let ids = match kind {
            Kind::User => &mut self.uid,
            Kind::Group => &mut self.gid,
        };
        (ids, privileged)
    }

    /// setuid(2) and setgid(2).
    pub fn set(&mut self, kind: Kind, id: u32) -> Result<(), Errno> {
        let (ids, privileged) = self.ids_mut(kind);
        ids.set(id, privileged)
    }

    /// setreuid(2) and setregid(2).
    pub fn set_real_effective(
        &mut self,
        kind: Kind,
        real: u32,
        effective: u32,
    ) -> Result<(), Errno> {
        let (ids, privileged) = self.ids_mut(kind);
        ids.set_real_effective(real, effective, privileged)
    }

    /// setresuid(2) and setresgid(2).
    pub fn set_all(
        &mut self,
        kind: Kind,
        real: u32,
        effective: u32,
        saved: u32,
    ) -> Result<(), Errno> {
        let (ids, privileged) = self.ids_mut(kind);
        ids.set_all(real, effective, saved, privileged)
    }

    /// setfsuid(2) and setfsgid(2): the old filesystem id.
    pub fn set_fs(&mut self, kind: Kind, fs: u32) -> u32 {
        let (ids, privileged) = self.ids_mut(kind);
        ids.set_fs(fs, privileged)
    }

    /// setgroups(2): kept sorted, as Linux keeps them.
    pub fn set_groups(&mut self, mut groups: Vec<u32>) -> Result<(), Errno> {
        if !self.privileged() {
            return Err(Errno::PERM);
        }
        if groups.len() > NGROUPS_MAX {
            return Err(Errno::INVAL);
        }
        groups.sort_unstable();
        self.groups = groups;
        Ok(())
    }

    /// What execve does to them: the effective ids are copied into the saved ones.
    pub fn on_exec(&mut self) {
        self.uid.saved = self.uid.effective;
        self.uid.fs = self.uid.effective;
        self.gid.saved = self.gid.effective;
        self.gid.fs = self.gid.effective;
    }

    /// Their record in a snapshot.
    pub fn record(&self) -> CredentialsRecord {
        CredentialsRecord {
            uids: self.uid.as_array(),
            gids: self.gid.as_array(),
            groups: self.groups.clone(),
        }
    }

    /// As a snapshot recorded them (checked by its bounds).
    pub fn from_record(record: &CredentialsRecord) -> Self {
        let ids = |[real, effective, saved, fs]: [u32; 4]| Ids {
            real,
            effective,
            saved,
            fs,
        };
        Credentials {
            uid: ids(record.uids),
            gid: ids(record.gids),
            groups: record.groups.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Kind::{Group, User};

    const POSTFIX: u32 = 105;

    #[test]
    fn root_drops_to_a_user_for_good_with_setuid() {
        let mut c = Credentials::default();
        c.set_groups(vec![POSTFIX]).unwrap();
        c.set(Group, POSTFIX).unwrap();
        c.set(User, POSTFIX).unwrap();
        assert_eq!(c.uid, Ids::all(POSTFIX));
        assert_eq!(c.gid, Ids::all(POSTFIX));
        assert!(!c.privileged());
        assert_eq!(c.set(User, 0), Err(Errno::PERM));
        assert_eq!(c.set_all(User, 0, 0, 0), Err(Errno::PERM));
        assert_eq!(c.set_groups(vec![]), Err(Errno::PERM));
        assert_eq!(c.set(Group, 0), Err(Errno::PERM));
        // Not taken, but reported.
        assert_eq!(c.set_fs(User, 0), POSTFIX);
        assert_eq!(c.uid.fs, POSTFIX);
    }

    #[test]
    fn an_effective_id_dropped_alone_can_be_taken_back() {
        // postfix's local delivery: seteuid(recipient), then seteuid(0).
        let mut c = Credentials::default();
        c.set_all(User, UNCHANGED, 1000, UNCHANGED).unwrap();
        assert_eq!((c.uid.real, c.uid.effective, c.uid.saved), (0, 1000, 0));
        assert_eq!(c.uid.fs, 1000);
        assert!(!c.privileged());
        assert_eq!(c.set(Group, 1000), Err(Errno::PERM));
        c.set_all(User, UNCHANGED, 0, UNCHANGED).unwrap();
        assert!(c.privileged());
        assert_eq!(c.uid, Ids::all(0));
    }

    #[test]
    fn setreuid_moves_the_saved_id_as_linux_does() {
        let mut c = Credentials::default();
        c.set_real_effective(User, UNCHANGED, 1000).unwrap();
        // An effective id other than the real one: the saved id follows it.
        assert_eq!((c.uid.real, c.uid.effective, c.uid.saved), (0, 1000, 1000));
        let mut c = Credentials::default();
        c.set_real_effective(User, 1000, 1000).unwrap();
        assert_eq!(c.uid, Ids::all(1000));
        // Unprivileged, the real id may become the effective one, and no other.
        let mut c = Credentials::default();
        c.set_all(User, 1000, 2000, 3000).unwrap();
        assert_eq!(
            c.set_real_effective(User, 3000, UNCHANGED),
            Err(Errno::PERM)
        );
        c.set_real_effective(User, 2000, UNCHANGED).unwrap();
        assert_eq!(
            (c.uid.real, c.uid.effective, c.uid.saved),
            (2000, 2000, 2000)
        );
    }

    #[test]
    fn minus_one_is_not_an_id() {
        let mut c = Credentials::default();
        assert_eq!(c.set(User, UNCHANGED), Err(Errno::INVAL));
        c.set_all(User, UNCHANGED, UNCHANGED, UNCHANGED).unwrap();
        assert_eq!(c, Credentials::default());
    }

    #[test]
    fn a_setresuid_that_changes_nothing_keeps_the_filesystem_id() {
        let mut c = Credentials::default();
        assert_eq!(c.set_fs(User, 77), 0);
        c.set_all(User, 0, UNCHANGED, 0).unwrap();
        assert_eq!(c.uid.fs, 77);
        // An effective id asked for resets it, even the same one.
        c.set_all(User, UNCHANGED, 0, UNCHANGED).unwrap();
        assert_eq!(c.uid.fs, 0);
    }

    #[test]
    fn groups_are_kept_sorted() {
        let mut c = Credentials::default();
        c.set_groups(vec![109, 8, 50]).unwrap();
        assert_eq!(c.groups, [8, 50, 109]);
    }

    #[test]
    fn execve_saves_the_effective_ids() {
        let mut c = Credentials::default();
        c.set_all(User, 0, 1000, 0).unwrap();
        c.on_exec();
        assert_eq!((c.uid.real, c.uid.effective, c.uid.saved), (0, 1000, 1000));
        assert_eq!(Credentials::from_record(&c.record()), c);
    }
}
