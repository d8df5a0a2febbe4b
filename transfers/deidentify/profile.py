"""The DICOM PS3.15 Basic Application Level Confidentiality Profile as data: Annex E, Table E.1-1.

Where each column comes from
    The basic profile's column is the `dicom-anonymizer` package's transcription of Table E.1-1
    (KitwareMedical, BSD; its `dicomfields_2026c` module, the 2026c edition of the standard),
    pinned in pyproject.toml: a new edition is a version bump, not an edit here. Its lists are
    read as data only; Relay applies the actions itself (`transfers.deidentify.apply`), because
    the package keeps its old->new UID map in one process-wide dictionary (every share would
    share it, and it would grow for ever) and gives random UIDs and fixed dummy dates.

    The option columns Relay offers (Retain Longitudinal Temporal Information with Modified
    Dates, Clean Descriptors, Retain Device Identity) are carried by no maintained Python package
    that installs beside this project's pins, so they are transcribed below from the same table
    (the 2024 edition's columns "Rtn. Long. Modif. Dates Opt.", "Clean Desc. Opt." and
    "Rtn. Dev. Id. Opt."). An attribute the 2026 edition added and these columns do not list
    gets its basic action: the conservative side.

    Private attributes (a row of the table, not a tag) are X.

Action codes (PS3.15 E.1.1)
    D replace with a non-zero-length dummy value; Z replace with a zero-length value (or a dummy);
    X remove; K keep; C clean (replace with values of similar meaning known not to identify);
    U replace with a non-zero-length UID, consistently within the set of instances.
    A compound code (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) lets the remover keep a Z or D where the IOD
    needs the attribute; Relay does not know each IOD's types, so it always takes that choice
    (Z, D or U: the value is gone either way and the output stays as conformant as the input).
"""

from __future__ import annotations

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _table

EDITION = "2026c"

# dicom-anonymizer's group name -> the action code of Table E.1-1.
_GROUPS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


def _basic() -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    actions: dict[int, str] = {}
    ranges: list[tuple[int, int, str]] = []
    for group, code in _GROUPS.items():
        for row in getattr(_table, group):
            if len(row) == 2:
                actions[(row[0] << 16) | row[1]] = code
            else:  # (group, element, group mask, element mask): a repeating group
                ranges.append((((row[2] << 16) | row[3]), (row[0] << 16) | row[1], code))
    return actions, tuple(ranges)


# Tag (as an int) -> its action code in the basic profile's column; and the rows that name a
# range, not a tag, as (mask, value, action) for tag & mask == value: Curve Data (50xx,xxxx),
# Overlay Data (60xx,3000) and Overlay Comments (60xx,4000), all X.
BASIC, REPEATING = _basic()
# Private Attributes: X (the Retain Safe Private Option, which Relay does not offer, would
# keep some).
PRIVATE = "X"

# How Relay resolves a compound code (see the module docstring).
RESOLVED = {"Z/D": "D", "X/Z": "Z", "X/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}

# The options' columns: tag -> the option's action (K keep, C clean). Transcribed from
# PS3.15 Table E.1-1.
RETAIN_DEVICE_IDENTITY: dict[int, str] = {
    0x00080054: "C",  # RetrieveAETitle
    0x00080055: "C",  # StationAETitle
    0x00081000: "C",  # NetworkID
    0x00081010: "K",  # StationName
    0x0014407C: "K",  # CalibrationTime
    0x0014407E: "K",  # CalibrationDate
    0x0016004E: "K",  # LensSpecification
    0x0016004F: "K",  # LensMake
    0x00160050: "K",  # LensModel
    0x00160051: "K",  # LensSerialNumber
    0x00181000: "K",  # DeviceSerialNumber
    0x00181002: "K",  # DeviceUID
    0x00181004: "K",  # PlateID
    0x00181005: "K",  # GeneratorID
    0x00181007: "K",  # CassetteID
    0x00181008: "K",  # GantryID
    0x00181009: "K",  # UniqueDeviceIdentifier
    0x0018100A: "K",  # UDISequence
    0x0018100B: "K",  # ManufacturerDeviceClassUID
    0x00181200: "K",  # DateOfLastCalibration
    0x00181201: "K",  # TimeOfLastCalibration
    0x00181202: "K",  # DateTimeOfLastCalibration
    0x00181203: "K",  # CalibrationDateTime
    0x00181204: "K",  # DateOfManufacture
    0x00181205: "K",  # DateOfInstallation
    0x00185011: "K",  # TransducerIdentificationSequence
    0x0018700A: "K",  # DetectorID
    0x0018700C: "K",  # DateOfLastDetectorCalibration
    0x0018700E: "K",  # TimeOfLastDetectorCalibration
    0x00189367: "K",  # XRaySourceID
    0x00189371: "K",  # XRayDetectorID
    0x00189373: "K",  # XRayDetectorLabel
    0x00203401: "K",  # ModifyingDeviceID
    0x00321020: "K",  # ScheduledStudyLocation
    0x00321021: "C",  # ScheduledStudyLocationAETitle
    0x00400001: "C",  # ScheduledStationAETitle
    0x00400010: "K",  # ScheduledStationName
    0x00400011: "K",  # ScheduledProcedureStepLocation
    0x00400241: "C",  # PerformedStationAETitle
    0x00400242: "K",  # PerformedStationName
    0x00404025: "K",  # ScheduledStationNameCodeSequence
    0x00404027: "K",  # ScheduledStationGeographicLocationCodeSequence
    0x00404028: "K",  # PerformedStationNameCodeSequence
    0x00404030: "K",  # PerformedStationGeographicLocationCodeSequence
    0x00500020: "K",  # DeviceDescription
    0x0072005E: "C",  # SelectorAEValue
    0x00741234: "C",  # ReceivingAE
    0x00741236: "C",  # RequestingAE
    0x04000563: "K",  # ModifyingSystem
    0x21000070: "C",  # Originator
    0x21000140: "C",  # DestinationAE
    0x30080105: "K",  # SourceSerialNumber
    0x300A00B2: "K",  # TreatmentMachineName
    0x300A0216: "K",  # SourceManufacturer
    0x300C0127: "K",  # BeamHoldTransitionDateTime
    0x3010002D: "K",  # DeviceLabel
    0x30100043: "K",  # ManufacturerDeviceIdentifier
}
RETAIN_MODIFIED_DATES: dict[int, str] = {
    0x00080012: "C",  # InstanceCreationDate
    0x00080013: "C",  # InstanceCreationTime
    0x00080015: "C",  # InstanceCoercionDateTime
    0x00080020: "C",  # StudyDate
    0x00080021: "C",  # SeriesDate
    0x00080022: "C",  # AcquisitionDate
    0x00080023: "C",  # ContentDate
    0x00080024: "C",  # OverlayDate
    0x00080025: "C",  # CurveDate
    0x0008002A: "C",  # AcquisitionDateTime
    0x00080030: "C",  # StudyTime
    0x00080031: "C",  # SeriesTime
    0x00080032: "C",  # AcquisitionTime
    0x00080033: "C",  # ContentTime
    0x00080034: "C",  # OverlayTime
    0x00080035: "C",  # CurveTime
    0x00080106: "C",  # ContextGroupVersion
    0x00080107: "C",  # ContextGroupLocalVersion
    0x00080201: "C",  # TimezoneOffsetFromUTC
    0x001021D0: "C",  # LastMenstrualDate
    0x00120086: "C",  # EthicsCommitteeApprovalEffectivenessStartDate
    0x00120087: "C",  # EthicsCommitteeApprovalEffectivenessEndDate
    0x0014407C: "C",  # CalibrationTime
    0x0014407E: "C",  # CalibrationDate
    0x0016008D: "C",  # GPSDateStamp
    0x00180027: "C",  # InterventionDrugStopTime
    0x00180035: "C",  # InterventionDrugStartTime
    0x00181012: "C",  # DateOfSecondaryCapture
    0x00181014: "C",  # TimeOfSecondaryCapture
    0x00181042: "C",  # ContrastBolusStartTime
    0x00181043: "C",  # ContrastBolusStopTime
    0x00181072: "C",  # RadiopharmaceuticalStartTime
    0x00181073: "C",  # RadiopharmaceuticalStopTime
    0x00181078: "C",  # RadiopharmaceuticalStartDateTime
    0x00181079: "C",  # RadiopharmaceuticalStopDateTime
    0x00181200: "C",  # DateOfLastCalibration
    0x00181201: "C",  # TimeOfLastCalibration
    0x00181202: "C",  # DateTimeOfLastCalibration
    0x00181203: "C",  # CalibrationDateTime
    0x00181204: "C",  # DateOfManufacture
    0x00181205: "C",  # DateOfInstallation
    0x0018700C: "C",  # DateOfLastDetectorCalibration
    0x0018700E: "C",  # TimeOfLastDetectorCalibration
    0x00189074: "C",  # FrameAcquisitionDateTime
    0x00189151: "C",  # FrameReferenceDateTime
    0x00189369: "C",  # SourceStartDateTime
    0x0018936A: "C",  # SourceEndDateTime
    0x00189516: "C",  # StartAcquisitionDateTime
    0x00189517: "C",  # EndAcquisitionDateTime
    0x00189623: "C",  # FunctionalSyncPulse
    0x00189701: "C",  # DecayCorrectionDateTime
    0x00189804: "C",  # ExclusionStartDateTime
    0x00189919: "C",  # InstructionPerformedDateTime
    0x0018A002: "C",  # ContributionDateTime
    0x00203403: "C",  # ModifiedImageDate
    0x00203405: "C",  # ModifiedImageTime
    0x00320032: "C",  # StudyVerifiedDate
    0x00320033: "C",  # StudyVerifiedTime
    0x00320034: "C",  # StudyReadDate
    0x00320035: "C",  # StudyReadTime
    0x00321000: "C",  # ScheduledStudyStartDate
    0x00321001: "C",  # ScheduledStudyStartTime
    0x00321010: "C",  # ScheduledStudyStopDate
    0x00321011: "C",  # ScheduledStudyStopTime
    0x00321040: "C",  # StudyArrivalDate
    0x00321041: "C",  # StudyArrivalTime
    0x00321050: "C",  # StudyCompletionDate
    0x00321051: "C",  # StudyCompletionTime
    0x00340007: "C",  # FrameOriginTimestamp
    0x0038001A: "C",  # ScheduledAdmissionDate
    0x0038001B: "C",  # ScheduledAdmissionTime
    0x0038001C: "C",  # ScheduledDischargeDate
    0x0038001D: "C",  # ScheduledDischargeTime
    0x00380020: "C",  # AdmittingDate
    0x00380021: "C",  # AdmittingTime
    0x00380030: "C",  # DischargeDate
    0x00380032: "C",  # DischargeTime
    0x003A0314: "C",  # ImpedanceMeasurementDateTime
    0x00400002: "C",  # ScheduledProcedureStepStartDate
    0x00400003: "C",  # ScheduledProcedureStepStartTime
    0x00400004: "C",  # ScheduledProcedureStepEndDate
    0x00400005: "C",  # ScheduledProcedureStepEndTime
    0x00400244: "C",  # PerformedProcedureStepStartDate
    0x00400245: "C",  # PerformedProcedureStepStartTime
    0x00400250: "C",  # PerformedProcedureStepEndDate
    0x00400251: "C",  # PerformedProcedureStepEndTime
    0x00402004: "C",  # IssueDateOfImagingServiceRequest
    0x00402005: "C",  # IssueTimeOfImagingServiceRequest
    0x00404005: "C",  # ScheduledProcedureStepStartDateTime
    0x00404008: "C",  # ScheduledProcedureStepExpirationDateTime
    0x00404010: "C",  # ScheduledProcedureStepModificationDateTime
    0x00404011: "C",  # ExpectedCompletionDateTime
    0x00404050: "C",  # PerformedProcedureStepStartDateTime
    0x00404051: "C",  # PerformedProcedureStepEndDateTime
    0x00404052: "C",  # ProcedureStepCancellationDateTime
    0x0040A023: "C",  # FindingsGroupRecordingDateTrial
    0x0040A024: "C",  # FindingsGroupRecordingTimeTrial
    0x0040A030: "C",  # VerificationDateTime
    0x0040A032: "C",  # ObservationDateTime
    0x0040A033: "C",  # ObservationStartDateTime
    0x0040A082: "C",  # ParticipationDateTime
    0x0040A110: "C",  # DateOfDocumentOrVerbalTransactionTrial
    0x0040A112: "C",  # TimeOfDocumentCreationOrVerbalTransactionTrial
    0x0040A120: "C",  # DateTime
    0x0040A121: "C",  # Date
    0x0040A122: "C",  # Time
    0x0040A13A: "C",  # ReferencedDateTime
    0x0040A192: "C",  # ObservationDateTrial
    0x0040A193: "C",  # ObservationTimeTrial
    0x0040DB06: "C",  # TemplateVersion
    0x0040DB07: "C",  # TemplateLocalVersion
    0x0040E004: "C",  # HL7DocumentEffectiveTime
    0x00440004: "C",  # ApprovalStatusDateTime
    0x0044000B: "C",  # ProductExpirationDateTime
    0x00440010: "C",  # SubstanceAdministrationDateTime
    0x00440104: "C",  # AssertionDateTime
    0x00440105: "C",  # AssertionExpirationDateTime
    0x00686226: "C",  # EffectiveDateTime
    0x00686270: "C",  # InformationIssueDateTime
    0x00700082: "C",  # PresentationCreationDate
    0x00700083: "C",  # PresentationCreationTime
    0x0072000A: "C",  # HangingProtocolCreationDateTime
    0x00720061: "C",  # SelectorDAValue
    0x00720063: "C",  # SelectorDTValue
    0x0072006B: "C",  # SelectorTMValue
    0x01000420: "C",  # SOPAuthorizationDateTime
    0x04000105: "C",  # DigitalSignatureDateTime
    0x04000310: "C",  # CertifiedTimestamp
    0x04000562: "C",  # AttributeModificationDateTime
    0x21000040: "C",  # CreationDate
    0x21000050: "C",  # CreationTime
    0x30060008: "C",  # StructureSetDate
    0x30060009: "C",  # StructureSetTime
    0x3006002D: "C",  # ROIDateTime
    0x3006002E: "C",  # ROIObservationDateTime
    0x30080024: "C",  # TreatmentControlPointDate
    0x30080025: "C",  # TreatmentControlPointTime
    0x30080054: "C",  # FirstTreatmentDate
    0x30080056: "C",  # MostRecentTreatmentDate
    0x30080162: "C",  # SafePositionExitDate
    0x30080164: "C",  # SafePositionExitTime
    0x30080166: "C",  # SafePositionReturnDate
    0x30080168: "C",  # SafePositionReturnTime
    0x30080250: "C",  # TreatmentDate
    0x30080251: "C",  # TreatmentTime
    0x300A0006: "C",  # RTPlanDate
    0x300A0007: "C",  # RTPlanTime
    0x300A022C: "C",  # SourceStrengthReferenceDate
    0x300A022E: "C",  # SourceStrengthReferenceTime
    0x300A0736: "C",  # TreatmentToleranceViolationDateTime
    0x300A073A: "C",  # RecordedRTControlPointDateTime
    0x300A0741: "C",  # InterlockDateTime
    0x300A0760: "C",  # OverrideDateTime
    0x300C0127: "C",  # BeamHoldTransitionDateTime
    0x300E0004: "C",  # ReviewDate
    0x300E0005: "C",  # ReviewTime
    0x3010004C: "C",  # IntendedPhaseStartDate
    0x3010004D: "C",  # IntendedPhaseEndDate
    0x30100085: "C",  # IntendedFractionStartTime
    0x40080100: "C",  # InterpretationRecordedDate
    0x40080101: "C",  # InterpretationRecordedTime
    0x40080108: "C",  # InterpretationTranscriptionDate
    0x40080109: "C",  # InterpretationTranscriptionTime
    0x40080112: "C",  # InterpretationApprovalDate
    0x40080113: "C",  # InterpretationApprovalTime
}
CLEAN_DESCRIPTORS: dict[int, str] = {
    0x00081030: "C",  # StudyDescription
    0x0008103E: "C",  # SeriesDescription
    0x00081080: "C",  # AdmittingDiagnosesDescription
    0x00081084: "C",  # AdmittingDiagnosesCodeSequence
    0x00081088: "C",  # PyramidDescription
    0x00082111: "C",  # DerivationDescription
    0x00084000: "C",  # IdentifyingComments
    0x00102000: "C",  # MedicalAlerts
    0x00102110: "C",  # Allergies
    0x00102180: "C",  # Occupation
    0x001021B0: "C",  # AdditionalPatientHistory
    0x00104000: "C",  # PatientComments
    0x00120051: "C",  # ClinicalTrialTimePointDescription
    0x00120072: "C",  # ClinicalTrialSeriesDescription
    0x0016002B: "C",  # MakerNote
    0x0016004B: "C",  # DeviceSettingDescription
    0x00180010: "C",  # ContrastBolusAgent
    0x00181030: "C",  # ProtocolName
    0x001811BB: "C",  # AcquisitionFieldOfViewLabel
    0x00181400: "C",  # AcquisitionDeviceProcessingDescription
    0x00184000: "C",  # AcquisitionComments
    0x00189185: "C",  # RespiratoryMotionCompensationTechniqueDescription
    0x0018937B: "C",  # MultienergyAcquisitionDescription
    0x0018937F: "C",  # DecompositionDescription
    0x00189424: "C",  # AcquisitionProtocolDescription
    0x00189937: "C",  # RequestedSeriesDescription
    0x0018A003: "C",  # ContributionDescription
    0x00200027: "C",  # PyramidLabel
    0x00204000: "C",  # ImageComments
    0x00209158: "C",  # FrameComments
    0x00321030: "C",  # ReasonForStudy
    0x00321060: "C",  # RequestedProcedureDescription
    0x00321066: "C",  # ReasonForVisit
    0x00321067: "C",  # ReasonForVisitCodeSequence
    0x00321070: "C",  # RequestedContrastAgent
    0x00324000: "C",  # StudyComments
    0x00380040: "C",  # DischargeDiagnosisDescription
    0x00380062: "C",  # ServiceEpisodeDescription
    0x00380500: "C",  # PatientState
    0x00384000: "C",  # VisitComments
    0x003A0329: "C",  # WaveformFilterDescription
    0x003A032B: "C",  # FilterLookupTableDescription
    0x00400007: "C",  # ScheduledProcedureStepDescription
    0x00400254: "C",  # PerformedProcedureStepDescription
    0x00400275: "C",  # RequestAttributesSequence
    0x00400280: "C",  # CommentsOnThePerformedProcedureStep
    0x00400310: "C",  # CommentsOnRadiationDose
    0x0040051A: "C",  # ContainerDescription
    0x00400600: "C",  # SpecimenShortDescription
    0x00400602: "C",  # SpecimenDetailedDescription
    0x00401002: "C",  # ReasonForTheRequestedProcedure
    0x0040100A: "C",  # ReasonForRequestedProcedureCodeSequence
    0x00401400: "C",  # RequestedProcedureComments
    0x00402001: "C",  # ReasonForTheImagingServiceRequest
    0x00402400: "C",  # ImagingServiceRequestComments
    0x00500021: "C",  # LongDeviceDescription
    0x006A0005: "C",  # AnnotationGroupLabel
    0x006A0006: "C",  # AnnotationGroupDescription
    0x00720066: "C",  # SelectorLOValue
    0x00720068: "C",  # SelectorLTValue
    0x0072006C: "C",  # SelectorSHValue
    0x0072006E: "C",  # SelectorSTValue
    0x00720070: "C",  # SelectorUTValue
    0x04000565: "C",  # ReasonForTheAttributeModification
    0x22000002: "C",  # LabelText
    0x30020121: "C",  # PositionAcquisitionTemplateName
    0x30020123: "C",  # PositionAcquisitionTemplateDescription
    0x30060002: "C",  # StructureSetLabel
    0x30060004: "C",  # StructureSetName
    0x30060006: "C",  # StructureSetDescription
    0x30060026: "C",  # ROIName
    0x30060028: "C",  # ROIDescription
    0x30060038: "C",  # ROIGenerationDescription
    0x30060085: "C",  # ROIObservationLabel
    0x30060088: "C",  # ROIObservationDescription
    0x300A0002: "C",  # RTPlanLabel
    0x300A0003: "C",  # RTPlanName
    0x300A0004: "C",  # RTPlanDescription
    0x300A000B: "C",  # TreatmentSites
    0x300A000E: "C",  # PrescriptionDescription
    0x300A0016: "C",  # DoseReferenceDescription
    0x300A0072: "C",  # FractionGroupDescription
    0x300A00C3: "C",  # BeamDescription
    0x300A00DD: "C",  # BolusDescription
    0x300A0196: "C",  # FixationDeviceDescription
    0x300A01A6: "C",  # ShieldingDeviceDescription
    0x300A01B2: "C",  # SetupTechniqueDescription
    0x300A02EB: "C",  # CompensatorDescription
    0x300A0608: "C",  # TreatmentPositionGroupLabel
    0x300A0619: "C",  # RadiationDoseIdentificationLabel
    0x300A0623: "C",  # RadiationDoseInVivoMeasurementLabel
    0x300A062A: "C",  # RTToleranceSetLabel
    0x300A0676: "C",  # EquipmentFrameOfReferenceDescription
    0x300A067C: "C",  # RadiationGenerationModeLabel
    0x300A067D: "C",  # RadiationGenerationModeDescription
    0x300A0734: "C",  # TreatmentToleranceViolationDescription
    0x300A0742: "C",  # InterlockDescription
    0x300A0783: "C",  # InterlockOriginDescription
    0x300A078E: "C",  # PatientTreatmentPreparationProcedureParameterDescription
    0x300A0792: "C",  # PatientTreatmentPreparationMethodDescription
    0x300A0794: "C",  # PatientSetupPhotoDescription
    0x300A079A: "C",  # DisplacementReferenceLabel
    0x300C0113: "C",  # ReasonForOmissionDescription
    0x3010000F: "C",  # ConceptualVolumeCombinationDescription
    0x30100017: "C",  # ConceptualVolumeDescription
    0x30100033: "C",  # UserContentLabel
    0x30100034: "C",  # UserContentLongLabel
    0x30100035: "C",  # EntityLabel
    0x30100036: "C",  # EntityName
    0x30100037: "C",  # EntityDescription
    0x30100038: "C",  # EntityLongLabel
    0x30100054: "C",  # RTPrescriptionLabel
    0x30100056: "C",  # RTTreatmentApproachLabel
    0x3010005A: "C",  # RTPhysicianIntentNarrative
    0x3010005C: "C",  # ReasonForSuperseding
    0x30100061: "C",  # PriorTreatmentDoseDescription
    0x30100077: "C",  # TreatmentSite
    0x3010007A: "C",  # TreatmentTechniqueNotes
    0x3010007B: "C",  # PrescriptionNotes
    0x3010007F: "C",  # FractionationNotes
    0x30100081: "C",  # PrescriptionNotesSequence
    0x4008010B: "C",  # InterpretationText
    0x40080115: "C",  # InterpretationDiagnosisDescription
    0x40080300: "C",  # Impressions
    0x40084000: "C",  # ResultsComments
}

# The options as the share form offers them, with their codes in PS3.16 CID 7050
# (De-identification Method), recorded in each copy's De-identification Method Code Sequence.
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES = {
    "retain_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_device": ("113109", "Retain Device Identity Option"),
}
OPTION_COLUMNS = {
    "retain_dates": RETAIN_MODIFIED_DATES,
    "clean_descriptors": CLEAN_DESCRIPTORS,
    "retain_device": RETAIN_DEVICE_IDENTITY,
}


def action_for(tag: int, *, options: frozenset[str] = frozenset()) -> str | None:
    """The action for one tag with these options ("retain_dates", "clean_descriptors",
    "retain_device"), the compound codes resolved; None for an attribute the table does not
    name (it is kept). An option's K or C overrides the basic action (PS3.15 E.3)."""
    if tag >> 16 & 1:
        return PRIVATE
    for option in sorted(options):
        action = OPTION_COLUMNS[option].get(tag)
        if action is not None:
            return action
    code = BASIC.get(tag)
    if code is None:
        code = next((act for mask, value, act in REPEATING if tag & mask == value), None)
    return RESOLVED.get(code, code) if code is not None else None
