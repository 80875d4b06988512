pub struct StaticFiles;
