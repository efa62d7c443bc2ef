//! The NoCloud seed disk for a `cloudInitNoCloud` volume: a small FAT image labelled
//! `CIDATA` holding `user-data`, `meta-data` and `network-config`, which cloud-init (and
//! anything else that reads the NoCloud data source) finds by its label.

use std::io::{Seek, Write};

/// The files of a seed disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub user_data: Vec<u8>,
    pub meta_data: Vec<u8>,
    pub network_config: Option<Vec<u8>>,
}

/// The volume label cloud-init looks for (it accepts `cidata` and `CIDATA`; FAT labels are
/// upper case).
pub const LABEL: &[u8; 11] = b"CIDATA     ";

const MIB: u64 = 1 << 20;

impl Seed {
    /// Image size: the files, rounded up per cluster, plus room for the FAT and the
    /// directory, in whole MiB.
    pub fn image_size(&self) -> u64 {
        let data: u64 = [
            self.user_data.len(),
            self.meta_data.len(),
            self.network_config.as_ref().map_or(0, Vec::len),
        ]
        .iter()
        .map(|&n| (n as u64).div_ceil(4096) * 4096)
        .sum();
        (data + data / 8 + MIB / 4).div_ceil(MIB) * MIB
    }

    /// Writes the image into `file` (empty, open for reading and writing) and syncs it.
    pub fn write(&self, mut file: std::fs::File) -> std::io::Result<()> {
        file.set_len(self.image_size())?;
        self.write_into(&mut file)?;
        file.sync_all()
    }

    /// Formats `disk` (already of [`Self::image_size`]) and writes the files into it.
    pub fn write_into<D: std::io::Read + Write + Seek>(&self, disk: &mut D) -> std::io::Result<()> {
        fatfs::format_volume(
            &mut *disk,
            fatfs::FormatVolumeOptions::new().volume_label(*LABEL),
        )?;
        disk.rewind()?;
        let fs = fatfs::FileSystem::new(&mut *disk, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            let mut files = vec![
                ("user-data", &self.user_data),
                ("meta-data", &self.meta_data),
            ];
            if let Some(network) = &self.network_config {
                files.push(("network-config", network));
            }
            for (name, data) in files {
                let mut file = root.create_file(name)?;
                file.truncate()?;
                file.write_all(data)?;
                file.flush()?;
            }
        }
        fs.unmount()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn seed_image_holds_the_files_under_the_cidata_label() {
        let seed = Seed {
            user_data: b"#cloud-config\npassword: secret\n".to_vec(),
            meta_data: b"instance-id: vm.ns\nlocal-hostname: vm\n".to_vec(),
            network_config: Some(vec![b'x'; 10_000]),
        };
        let mut disk = std::io::Cursor::new(vec![0u8; seed.image_size() as usize]);
        seed.write_into(&mut disk).unwrap();
        disk.rewind().unwrap();
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let root = fs.root_dir();
        for (name, want) in [
            ("user-data", &seed.user_data),
            ("meta-data", &seed.meta_data),
            ("network-config", seed.network_config.as_ref().unwrap()),
        ] {
            let mut got = Vec::new();
            root.open_file(name).unwrap().read_to_end(&mut got).unwrap();
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn seed_image_grows_with_its_files() {
        let small = Seed {
            user_data: vec![1; 10],
            meta_data: vec![2; 10],
            network_config: None,
        };
        assert_eq!(small.image_size(), MIB);
        let big = Seed {
            user_data: vec![1; 3 << 20],
            ..small
        };
        let mut disk = std::io::Cursor::new(vec![0u8; big.image_size() as usize]);
        big.write_into(&mut disk).unwrap();
        assert!(big.image_size() >= 4 * MIB);
    }
}
